//! Per-chunk cost of the OpenAI mapping: JSON parse of one `chat.completion.chunk`
//! plus its translation to core `ModelEvent`s (target: < 2 µs per chunk).

use std::hint::black_box;

use chat_llm_openai::{StreamChunk, StreamMapper};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

/// A text chunk as api.openai.com sends it today (with the `obfuscation` padding).
const TEXT: &str = r#"{"id":"chatcmpl-BxYZ123","object":"chat.completion.chunk","created":1732492800,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":" token"},"logprobs":null,"finish_reason":null}],"obfuscation":"abcd"}"#;
/// A reasoning chunk of a compatible server (vLLM/DeepSeek style).
const REASONING: &str = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1732492800,"model":"deepseek-r1","choices":[{"index":0,"delta":{"reasoning_content":" think","content":null},"logprobs":null,"finish_reason":null}]}"#;
/// A piece of streamed tool arguments.
const TOOL_ARGS: &str = r#"{"id":"chatcmpl-BxYZ123","object":"chat.completion.chunk","created":1732492800,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"city\":\"Pa"}}]},"logprobs":null,"finish_reason":null}],"obfuscation":"x"}"#;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("openai_mapping");
    g.throughput(Throughput::Elements(1));
    for (name, chunk) in [("text_chunk", TEXT), ("reasoning_chunk", REASONING)] {
        let mut mapper = StreamMapper::new();
        g.bench_function(format!("parse_and_map_{name}"), |b| {
            b.iter(|| {
                let chunk: StreamChunk = serde_json::from_str(black_box(chunk)).unwrap();
                mapper.push(chunk);
                black_box(mapper.pop())
            });
        });
    }
    let first = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}"#;
    // A fresh started call per batch, so the argument buffer stays small.
    let started = || {
        let mut mapper = StreamMapper::new();
        mapper.push(serde_json::from_str(first).unwrap());
        while mapper.pop().is_some() {}
        mapper
    };
    g.bench_function("parse_and_map_tool_args_chunk", |b| {
        b.iter_batched_ref(
            started,
            |mapper| {
                let chunk: StreamChunk = serde_json::from_str(black_box(TOOL_ARGS)).unwrap();
                mapper.push(chunk);
                black_box(mapper.pop())
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

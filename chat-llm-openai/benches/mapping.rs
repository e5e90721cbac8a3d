//! Per-chunk cost of the OpenAI mapping: JSON parse + event mapping.

use chat_llm_openai::{StreamChunk, StreamMapper};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const CHUNK: &str = r#"{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1732492800,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":" token"},"logprobs":null,"finish_reason":null}],"obfuscation":"abcd"}"#;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("openai_mapping");
    g.throughput(Throughput::Elements(1));
    let mut mapper = StreamMapper::new();
    g.bench_function("parse_and_map_text_chunk", |b| {
        b.iter(|| {
            let chunk: StreamChunk = serde_json::from_str(std::hint::black_box(CHUNK)).unwrap();
            mapper.push(chunk);
            std::hint::black_box(mapper.pop())
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

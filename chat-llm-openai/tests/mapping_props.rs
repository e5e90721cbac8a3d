//! Property tests of the chunk mapping: however a server splits and
//! interleaves tool call fragments, the calls come out whole and in order.

use chat_core::{FinishReason, ModelEvent};
use chat_llm_openai::{StreamChunk, StreamMapper};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Splits `s` into pieces at the given (char-boundary) cut points.
fn split(s: &str, cuts: &[usize]) -> Vec<String> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| c % (s.len() + 1))
        .filter(|c| s.is_char_boundary(*c))
        .collect();
    points.sort_unstable();
    points.dedup();
    let mut out = Vec::new();
    let mut from = 0;
    for p in points {
        out.push(s[from..p].to_owned());
        from = p;
    }
    out.push(s[from..].to_owned());
    out
}

fn tool_chunk(index: usize, first: bool, name: &str, args: &str) -> StreamChunk {
    let mut call = json!({"index": index, "function": {"arguments": args}});
    if first {
        call["id"] = json!(format!("call_{index}"));
        call["type"] = json!("function");
        call["function"]["name"] = json!(name);
    }
    serde_json::from_value(json!({"choices":[{"index":0,"delta":{"tool_calls":[call]}}]})).unwrap()
}

fn arb_input() -> impl Strategy<Value = Value> {
    (
        "[a-zA-Z é€😀\"\\\\]{0,12}",
        any::<i32>(),
        prop::collection::vec(any::<bool>(), 0..4),
    )
        .prop_map(
            |(s, n, flags)| json!({"city": s, "n": n, "flags": flags, "nested": {"x": [n, s]}}),
        )
}

proptest! {
    #[test]
    fn split_and_interleaved_tool_calls_are_reassembled(
        inputs in prop::collection::vec(arb_input(), 1..4),
        cuts in prop::collection::vec(prop::collection::vec(any::<usize>(), 0..8), 4),
        order_seed in any::<u64>(),
        text_before in "[a-z ]{0,10}",
    ) {
        let mut mapper = StreamMapper::new();
        let mut out = Vec::new();
        let drain = |m: &mut StreamMapper, out: &mut Vec<ModelEvent>| {
            while let Some(e) = m.pop() {
                out.push(e.unwrap());
            }
        };
        if !text_before.is_empty() {
            let c: StreamChunk = serde_json::from_value(
                json!({"choices":[{"index":0,"delta":{"content": text_before}}]}),
            ).unwrap();
            mapper.push(c);
        }
        // Each call's argument text in pieces; the first piece carries id + name.
        let mut queues: Vec<Vec<String>> = inputs
            .iter()
            .enumerate()
            .map(|(i, v)| split(&v.to_string(), &cuts[i]))
            .collect();
        for q in &mut queues {
            q.reverse();
        }
        let mut first = vec![true; queues.len()];
        let mut seed = order_seed;
        // Interleave: call i may only start after call i-1 started (as servers do).
        while queues.iter().any(|q| !q.is_empty()) {
            let open: Vec<usize> = (0..queues.len())
                .filter(|&i| !queues[i].is_empty() && (i == 0 || !first[i - 1]))
                .collect();
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let i = open[(seed >> 33) as usize % open.len()];
            let piece = queues[i].pop().unwrap();
            mapper.push(tool_chunk(i, first[i], &format!("tool{i}"), &piece));
            first[i] = false;
            drain(&mut mapper, &mut out);
        }
        let fin: StreamChunk = serde_json::from_value(
            json!({"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}),
        ).unwrap();
        mapper.push(fin);
        mapper.end();
        drain(&mut mapper, &mut out);

        let calls: Vec<(String, Value)> = out
            .iter()
            .filter_map(|e| match e {
                ModelEvent::ToolCall { id, input, .. } => Some((id.clone(), input.clone())),
                _ => None,
            })
            .collect();
        let expected: Vec<(String, Value)> = inputs
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("call_{i}"), v.clone()))
            .collect();
        prop_assert_eq!(calls, expected);
        for (i, v) in inputs.iter().enumerate() {
            let id = format!("call_{i}");
            let streamed: String = out
                .iter()
                .filter_map(|e| match e {
                    ModelEvent::ToolInputDelta { id: d, delta } if *d == id => Some(delta.as_str()),
                    _ => None,
                })
                .collect();
            prop_assert_eq!(streamed, v.to_string());
        }
        prop_assert!(
            matches!(out.last(), Some(ModelEvent::Finish { reason: FinishReason::ToolCalls, .. })),
            "{:?}", out.last()
        );
    }
}

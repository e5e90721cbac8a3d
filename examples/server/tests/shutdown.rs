//! Graceful shutdown (SIGTERM): running answers finish within the grace
//! period, or are stopped and stored with what they have; the process exits 0.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use support::{Db, Server, read_deltas};

fn sigterm(s: &Server) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the process to exit by itself; panics after `limit`.
fn wait_exit(s: &mut Server, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "server did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn graceful(db: Db) {
    let user = "graceful";

    // 1. An answer that fits in the grace period completes, reaches the
    //    client in full, and is stored as finished.
    let env = [
        ("TOKENS", "40"),
        ("TOKEN_DELAY_MS", "10"),
        ("SHUTDOWN_GRACE_MS", "5000"),
    ];
    let chat;
    {
        let mut s = Server::start(&db, &env);
        chat = s.create_chat(user).await;
        let res = s.send(user, &chat, "finish before you go").await;
        let (mut seen, mut rest) = read_deltas(res, 3).await;
        sigterm(&s);
        while let Some(chunk) = rest.next().await {
            seen.extend_from_slice(&chunk.unwrap());
        }
        let text = String::from_utf8(seen).unwrap();
        assert!(text.contains("tok39 "), "client got the whole answer");
        assert!(text.ends_with("data: [DONE]\n\n"));
        let status = wait_exit(&mut s, Duration::from_secs(10));
        assert!(status.success(), "{status:?}");
    }
    let s = Server::start(&db, &env);
    let msgs = s.messages(user, &chat).await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let answer = msgs[1]["parts"][1]["text"].as_str().unwrap();
    assert!(answer.ends_with("tok39 "), "{answer}");
    assert_eq!(msgs[1]["metadata"]["finishReason"], "stop");
    drop(s);

    // 2. An answer longer than the grace period is stopped when it runs out
    //    and stored with what was produced (not left as a crash checkpoint).
    let env = [
        ("TOKENS", "2000"),
        ("TOKEN_DELAY_MS", "10"),
        ("CHECKPOINT_MS", "10000"),
        ("SHUTDOWN_GRACE_MS", "300"),
    ];
    let chat;
    {
        let mut s = Server::start(&db, &env);
        chat = s.create_chat(user).await;
        let res = s.send(user, &chat, "too long to wait for").await;
        let (_, rest) = read_deltas(res, 3).await;
        let started = Instant::now();
        sigterm(&s);
        let status = wait_exit(&mut s, Duration::from_secs(10));
        assert!(status.success(), "{status:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "shutdown waited for the whole answer"
        );
        drop(rest);
    }
    let s = Server::start(&db, &env);
    let msgs = s.messages(user, &chat).await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let answer = msgs[1]["parts"][1]["text"].as_str().unwrap();
    // Checkpoints are 10 s apart, so anything past the first tokens was
    // written by the shutdown's finalize, not by a checkpoint.
    assert!(answer.starts_with("tok0 tok1 tok2 "), "{answer}");
    assert!(!answer.contains("tok1999"), "{answer}");
    assert_ne!(msgs[1]["metadata"]["finishReason"], "error");
    drop(s);
    db.drop_db().await;
}

#[tokio::test]
async fn sigterm_lets_answers_finalize_on_sqlite() {
    graceful(Db::sqlite()).await;
}

#[tokio::test]
async fn sigterm_lets_answers_finalize_on_postgres() {
    if let Some(db) = Db::postgres().await {
        graceful(db).await;
    }
}

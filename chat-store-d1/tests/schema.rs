//! The D1 schema is chat-store-sqlx's SQLite schema, file for file, except the
//! migrations that only the sqlx store needs (a host test: it reads the
//! migration folders, it does not need `worker`).

use std::path::Path;

fn files(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// Triggers that let the sqlx store write a message in one statement. D1's
/// store touches the chat in the same atomic `batch` instead, and wrangler's
/// migration runner splits statements at `;`, which cuts a trigger body.
const SQLX_ONLY: &[&str] = &["0002_message_touches_chat.sql"];

#[test]
fn d1_migrations_are_the_sqlite_migrations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d1 = files(&root.join("migrations"));
    let sqlite: Vec<(String, String)> = files(&root.join("../chat-store-sqlx/migrations/sqlite"))
        .into_iter()
        .filter(|(name, _)| !SQLX_ONLY.contains(&name.as_str()))
        .collect();
    assert!(!d1.is_empty());
    assert_eq!(d1, sqlite);
}

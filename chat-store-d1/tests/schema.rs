//! The D1 schema is chat-store-sqlx's SQLite schema, file for file (a host test:
//! it reads the migration folders, it does not need `worker`).

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

#[test]
fn d1_migrations_are_the_sqlite_migrations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d1 = files(&root.join("migrations"));
    let sqlite = files(&root.join("../chat-store-sqlx/migrations/sqlite"));
    assert!(!d1.is_empty());
    assert_eq!(d1, sqlite);
}

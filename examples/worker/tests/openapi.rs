//! The Worker serves `openapi.json`; it must be the Axum router's document
//! (the same contract). Regenerate with `UPDATE_OPENAPI=1 cargo test -p chat-worker-example`.

#[test]
fn served_openapi_document_is_the_contracts() {
    use utoipa::OpenApi as _;
    let expected = chat_http::axum::ApiDoc::openapi().to_pretty_json().unwrap() + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let served = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        served, expected,
        "run with UPDATE_OPENAPI=1 to refresh openapi.json"
    );
    let doc: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert!(doc["paths"]["/api/chat/{chatId}/messages"]["post"].is_object());
}

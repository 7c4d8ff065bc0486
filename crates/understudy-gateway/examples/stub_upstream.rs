//! A fast OpenAI-compatible stub upstream, for `bench/gateway-overhead`.
//!
//! Run: `cargo run --release -p understudy-gateway --example stub_upstream -- 127.0.0.1:9000`

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

#[path = "../tests/support/stub.rs"]
mod stub;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("stub upstream on http://{}/v1", listener.local_addr()?);
    axum::serve(listener, stub::Stub { keep_log: false, ..Default::default() }.router()).await
}

//! The bank-account example on the in-memory store:
//! `cargo run --example bank_account`.

use esframe_examples::bank_account::run_demo;
use esframe_memory::MemoryStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    println!("esframe bank account (in-memory store)\n");
    run_demo(MemoryStore::new(), &mut std::io::stdout()).await?;
    Ok(())
}

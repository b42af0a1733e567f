#[tokio::main]
async fn main() {
    std::process::exit(lanes_common::service::main(lanes_ingest::def()).await);
}

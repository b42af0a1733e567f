#[tokio::main]
async fn main() {
    std::process::exit(lanes_common::service::main(lanes_micro_batcher::def()).await);
}

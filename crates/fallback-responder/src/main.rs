#[tokio::main]
async fn main() {
    std::process::exit(lanes_common::service::main(lanes_fallback_responder::def()).await);
}

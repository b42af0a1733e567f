#[tokio::main]
async fn main() {
    std::process::exit(lanes_common::service::main(lanes_cache_writer::def()).await);
}

//! A real embedded registry in this process that, like a registry with rights per
//! subject (Confluent RBAC, Karapace ACLs), answers 403 to reads of schema ids
//! registered under subjects its caller may not read.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::IntoResponse;
use tokio_util::sync::CancellationToken;

pub struct RightsRegistry {
    pub url: String,
    forbidden: Arc<Mutex<HashSet<u32>>>,
    stop: CancellationToken,
}

impl RightsRegistry {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("registry port");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let forbidden = Arc::new(Mutex::new(HashSet::new()));
        let ids = forbidden.clone();
        let app =
            lanes_schema_registry::api::router(Arc::new(lanes_schema_registry::Store::in_memory()))
                .layer(axum::middleware::from_fn(
                    move |request: Request, next: Next| {
                        let refused = request.method() == Method::GET
                            && schema_id(request.uri().path())
                                .is_some_and(|id| ids.lock().expect("ids").contains(&id));
                        async move {
                            if refused {
                                return (
                                    StatusCode::FORBIDDEN,
                                    axum::Json(serde_json::json!({
                                        "error_code": 40301,
                                        "message": "User is denied operation Read on this subject"
                                    })),
                                )
                                    .into_response();
                            }
                            next.run(request).await
                        }
                    },
                ));
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await
        });
        Self {
            url,
            forbidden,
            stop,
        }
    }

    /// Reads of `id` are refused from now on.
    pub fn forbid(&self, id: u32) {
        self.forbidden.lock().expect("ids").insert(id);
    }

    /// Reads of `id` are answered again (read rights granted).
    pub fn grant(&self, id: u32) {
        self.forbidden.lock().expect("ids").remove(&id);
    }
}

impl Drop for RightsRegistry {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The id in `/schemas/ids/{id}` and the paths under it.
fn schema_id(path: &str) -> Option<u32> {
    path.strip_prefix("/schemas/ids/")?
        .split('/')
        .next()?
        .parse()
        .ok()
}

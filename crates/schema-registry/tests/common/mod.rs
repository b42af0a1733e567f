//! The registry over real HTTP, in-process on a free port, as Confluent clients call
//! it: the harness the HTTP test files share.

#![allow(dead_code)] // Each test file uses its own part of the harness.

use std::path::Path;
use std::sync::Arc;

use lanes_schema_registry::{ServerOptions, Store, run_with};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const CT: &str = "application/vnd.schemaregistry.v1+json";

pub const V1: &str =
    r#"{"type":"record","name":"Event","namespace":"t","fields":[{"name":"id","type":"string"}]}"#;
pub const V2_OPTIONAL: &str = r#"{"type":"record","name":"Event","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"note","type":["null","string"],"default":null}]}"#;
pub const V2_REQUIRED: &str = r#"{"type":"record","name":"Event","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"amount","type":"double"}]}"#;

pub struct Registry {
    pub url: String,
    pub http: reqwest::Client,
    token: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Registry {
    pub async fn start(dir: Option<&Path>) -> Self {
        Self::start_with(dir, ServerOptions::default()).await
    }

    pub async fn start_with(dir: Option<&Path>, options: ServerOptions) -> Self {
        let store = match dir {
            Some(d) => Store::open(d).unwrap(),
            None => Store::in_memory(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let token = CancellationToken::new();
        let task = tokio::spawn(run_with(listener, Arc::new(store), options, token.clone()));
        Self {
            url,
            http: reqwest::Client::new(),
            token,
            task,
        }
    }

    pub async fn stop(self) {
        self.token.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// Sends a request and reads the answer, which must carry Confluent's content type.
    pub async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> (StatusCode, Value) {
        let resp = req.send().await.unwrap();
        let status = resp.status();
        assert_eq!(resp.headers()["content-type"], CT, "{what}");
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{}", self.url, path));
        if let Some(b) = body {
            req = req.header("Content-Type", CT).body(b.to_string());
        }
        self.send(req, path).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    pub async fn register(&self, subject: &str, schema: &str) -> (StatusCode, Value) {
        self.post(
            &format!("/subjects/{subject}/versions"),
            json!({ "schema": schema }),
        )
        .await
    }
}

pub fn error_code(body: &Value) -> i64 {
    body["error_code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error_code in {body}"))
}

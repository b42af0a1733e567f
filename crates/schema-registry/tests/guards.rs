//! What the server refuses before a handler runs, over real HTTP: request bodies over
//! the size limit (413), and requests without the basic-auth credentials (401).

mod common;

use common::*;
use lanes_schema_registry::{Credentials, DEFAULT_MAX_BODY_BYTES, ServerOptions};
use reqwest::StatusCode;
use serde_json::json;

/// A schema body of about `bytes` bytes: a record whose doc pads it out.
fn schema_body_of(bytes: usize) -> String {
    let schema = json!({
        "type": "record", "name": "Big", "doc": "x".repeat(bytes),
        "fields": [{"name": "a", "type": "string"}],
    });
    json!({ "schema": schema.to_string() }).to_string()
}

#[tokio::test]
async fn oversized_bodies_get_413_with_a_confluent_error_body() {
    let r = Registry::start(None).await;
    let url = format!("{}/subjects/big/versions", r.url);
    let (s, body) = r
        .send(
            r.http
                .post(&url)
                .header("Content-Type", CT)
                .body(schema_body_of(DEFAULT_MAX_BODY_BYTES + 1)),
            "default limit",
        )
        .await;
    assert_eq!(
        (s, error_code(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, 413),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("larger"));
    // Under the limit, the same kind of body registers.
    let (s, body) = r
        .send(
            r.http
                .post(&url)
                .header("Content-Type", CT)
                .body(schema_body_of(DEFAULT_MAX_BODY_BYTES / 2)),
            "under the limit",
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    r.stop().await;

    // A configured limit applies to every endpoint with a body.
    let r = Registry::start_with(
        None,
        ServerOptions {
            max_body_bytes: 256,
            ..ServerOptions::default()
        },
    )
    .await;
    for path in [
        "/subjects/s/versions",
        "/subjects/s",
        "/compatibility/subjects/s/versions",
        "/config",
    ] {
        let (s, body) = r
            .send(
                r.http
                    .request(
                        if path == "/config" {
                            reqwest::Method::PUT
                        } else {
                            reqwest::Method::POST
                        },
                        format!("{}{path}", r.url),
                    )
                    .body(schema_body_of(300)),
                path,
            )
            .await;
        assert_eq!(
            (s, error_code(&body)),
            (StatusCode::PAYLOAD_TOO_LARGE, 413),
            "{path}"
        );
    }
    assert_eq!(r.register("s", V1).await.0, StatusCode::OK);
    r.stop().await;
}

#[tokio::test]
async fn basic_auth_guards_every_endpoint_when_set() {
    let r = Registry::start_with(
        None,
        ServerOptions {
            max_body_bytes: 256,
            basic_auth: Some(Credentials::parse("lanes:pa:ss").unwrap()),
        },
    )
    .await;
    let without = [
        ("GET", "/"),
        ("GET", "/subjects"),
        ("GET", "/schemas/ids/1"),
        ("GET", "/config"),
        ("PUT", "/config"),
        ("POST", "/subjects/s/versions"),
        ("DELETE", "/subjects/s"),
        ("GET", "/mode"),
        ("GET", "/no/such/path"),
    ];
    for (method, path) in without {
        let req = r
            .http
            .request(method.parse().unwrap(), format!("{}{path}", r.url))
            // Larger than the body limit: auth answers first, without reading it.
            .body(schema_body_of(300));
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Basic"), "{challenge}");
        assert_eq!(resp.headers()["content-type"], CT);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(error_code(&body), 401);
    }
    for (user, password) in [("lanes", "pa:sx"), ("other", "pa:ss"), ("lanes", "")] {
        let resp = r
            .http
            .get(format!("{}/subjects", r.url))
            .basic_auth(user, Some(password))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{user}:{password}");
    }

    let authed = |req: reqwest::RequestBuilder| req.basic_auth("lanes", Some("pa:ss"));
    let (s, body) = r
        .send(
            authed(r.http.post(format!("{}/subjects/s/versions", r.url)))
                .header("Content-Type", CT)
                .body(json!({ "schema": V1 }).to_string()),
            "register",
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = r
        .send(
            authed(r.http.get(format!("{}/subjects", r.url))),
            "subjects",
        )
        .await;
    assert_eq!((s, body), (StatusCode::OK, json!(["s"])));
    // Authenticated, the other guards and errors answer as usual.
    let (s, _) = r
        .send(
            authed(r.http.post(format!("{}/subjects/s/versions", r.url))).body(schema_body_of(300)),
            "too large",
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, _) = r
        .send(authed(r.http.get(format!("{}/no/such/path", r.url))), "404")
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    r.stop().await;
}

//! The queries and endpoints Confluent's clients send beyond the core API, over real
//! HTTP: Python's capitalised booleans, paging and filters, and the small endpoints
//! (`referencedby`, id subjects, contexts, modes, global config delete), with
//! Confluent's error bodies wherever a request does not parse.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn capitalised_boolean_flags_are_read_as_confluent_reads_them() {
    let r = Registry::start(None).await;
    let id = r.register("b", V1).await.1["id"].clone();
    r.register("b", V2_OPTIONAL).await;

    // lookup_schema and test_compatibility, exactly as confluent-kafka 2.x sends them.
    let (s, body) = r
        .post(
            "/subjects/b?normalize=False&deleted=False",
            json!({ "schema": V1 }),
        )
        .await;
    assert_eq!((s, &body["id"]), (StatusCode::OK, &id), "{body}");
    let (s, body) = r
        .post(
            "/compatibility/subjects/b/versions/latest?normalize=False&verbose=True",
            json!({ "schema": V2_REQUIRED }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["is_compatible"], false);
    assert!(body["messages"].is_array(), "verbose=True is true: {body}");
    let (s, _) = r
        .post(
            "/subjects/b/versions?normalize=False",
            json!({ "schema": V1 }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    assert_eq!(r.delete("/subjects/b/versions/2").await.1, json!(2));
    assert_eq!(
        r.get("/subjects/b/versions?deleted=TRUE").await.1,
        json!([1, 2])
    );
    assert_eq!(
        r.get("/subjects/b/versions?deleted=false").await.1,
        json!([1])
    );
    assert_eq!(
        r.delete("/subjects/b/versions/2?permanent=True").await.1,
        json!(2)
    );

    // Not a boolean: refused with a Confluent error body, not read as false.
    let (s, body) = r.delete("/subjects/b?permanent=yes").await;
    assert_eq!((s, error_code(&body)), (StatusCode::BAD_REQUEST, 400));
    assert!(
        body["message"].as_str().unwrap().contains("true or false"),
        "{body}"
    );
    r.stop().await;
}

#[tokio::test]
async fn listings_page_and_filter_like_confluent() {
    let r = Registry::start(None).await;
    let id = r.register("a-value", V1).await.1["id"].clone();
    r.register("a-value", V2_OPTIONAL).await;
    r.register("b-value", V1).await;
    r.register("gone", V1).await;
    r.delete("/subjects/gone").await;

    assert_eq!(
        r.get("/subjects?deleted=False&deleted_only=False&offset=0&limit=-1")
            .await
            .1,
        json!(["a-value", "b-value"])
    );
    assert_eq!(
        r.get("/subjects?offset=1&limit=1").await.1,
        json!(["b-value"])
    );
    assert_eq!(
        r.get("/subjects?subjectPrefix=b").await.1,
        json!(["b-value"])
    );
    assert_eq!(
        r.get("/subjects?subjectPrefix=:*:&deleted=true").await.1,
        json!(["a-value", "b-value", "gone"])
    );
    assert_eq!(r.get("/subjects?deletedOnly=true").await.1, json!(["gone"]));
    assert_eq!(
        r.get("/subjects?deleted_only=True").await.1,
        json!(["gone"])
    );
    assert_eq!(
        r.get("/subjects/a-value/versions?offset=1").await.1,
        json!([2])
    );

    assert_eq!(
        r.get(&format!("/schemas/ids/{id}/subjects")).await.1,
        json!(["a-value", "b-value"])
    );
    assert_eq!(
        r.get(&format!("/schemas/ids/{id}/subjects?deleted=True"))
            .await
            .1,
        json!(["a-value", "b-value", "gone"])
    );
    assert_eq!(
        r.get(&format!("/schemas/ids/{id}/versions?subject=b-value"))
            .await
            .1,
        json!([{"subject": "b-value", "version": 1}])
    );
    assert_eq!(
        r.get("/subjects/a-value/versions/1/referencedby").await.1,
        json!([])
    );
    let (s, body) = r.get("/subjects/a-value/versions/9/referencedby").await;
    assert_eq!((s, error_code(&body)), (StatusCode::NOT_FOUND, 40402));
    assert_eq!(r.get("/contexts?offset=0&limit=-1").await.1, json!(["."]));
    r.stop().await;
}

#[tokio::test]
async fn config_and_mode_endpoints_the_clients_call() {
    let r = Registry::start(None).await;
    // set_config sends the name get_config answers with.
    assert_eq!(
        r.put("/config", json!({"compatibilityLevel": "FULL"}))
            .await
            .1,
        json!({"compatibility": "FULL"})
    );
    let (s, body) = r.put("/config", json!({"normalize": true})).await;
    assert_eq!(
        (s, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42203)
    );
    // Deleting the global config restores the default and answers with the old one.
    assert_eq!(
        r.delete("/config").await.1,
        json!({"compatibilityLevel": "FULL"})
    );
    assert_eq!(
        r.get("/config").await.1,
        json!({"compatibilityLevel": "BACKWARD"})
    );

    for path in ["/mode", "/mode/s"] {
        assert_eq!(r.get(path).await.1, json!({"mode": "READWRITE"}), "{path}");
        assert_eq!(
            r.put(&format!("{path}?force=False"), json!({"mode": "READWRITE"}))
                .await
                .1,
            json!({"mode": "READWRITE"})
        );
        let (s, body) = r.put(path, json!({"mode": "READONLY"})).await;
        assert_eq!(
            (s, error_code(&body)),
            (StatusCode::UNPROCESSABLE_ENTITY, 42205)
        );
        let (s, body) = r.put(path, json!({"mode": "SIDEWAYS"})).await;
        assert_eq!(
            (s, error_code(&body)),
            (StatusCode::UNPROCESSABLE_ENTITY, 42204)
        );
    }
    assert_eq!(r.delete("/mode/s").await.1, json!({"mode": "READWRITE"}));
    r.stop().await;
}

#[tokio::test]
async fn unreadable_requests_get_confluent_error_bodies() {
    let r = Registry::start(None).await;
    let (s, body) = r.get("/no/such/path").await;
    assert_eq!((s, error_code(&body)), (StatusCode::NOT_FOUND, 404));
    let (s, body) = r.put("/subjects", json!({})).await;
    assert_eq!(
        (s, error_code(&body)),
        (StatusCode::METHOD_NOT_ALLOWED, 405)
    );
    let (s, body) = r.get("/schemas/ids/abc").await;
    assert_eq!((s, error_code(&body)), (StatusCode::BAD_REQUEST, 400));
    let (s, body) = r.get("/subjects?offset=-1").await;
    assert_eq!((s, error_code(&body)), (StatusCode::BAD_REQUEST, 400));
    r.stop().await;
}

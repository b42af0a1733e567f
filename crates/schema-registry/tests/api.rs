//! The registry over real HTTP, in-process on a free port, as Confluent clients call it.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn register_lookup_and_read_back() {
    let r = Registry::start(None).await;
    let (s, body) = r.register("orders-value", V1).await;
    assert_eq!(s, StatusCode::OK);
    let id = body["id"].as_i64().unwrap();

    // The same schema twice, and with other whitespace, keeps its id and version.
    let spaced = V1.replace(':', " : ");
    assert_eq!(r.register("orders-value", &spaced).await.1["id"], id);
    assert_eq!(r.get("/subjects/orders-value/versions").await.1, json!([1]));

    // Clients that send schemaType and empty references, as Confluent's do.
    let (s, body) = r
        .post(
            "/subjects/orders-value/versions",
            json!({"schema": V1, "schemaType": "AVRO", "references": [], "metadata": null}),
        )
        .await;
    assert_eq!((s, body["id"].as_i64()), (StatusCode::OK, Some(id)));

    let (s, body) = r
        .post("/subjects/orders-value", json!({ "schema": V1 }))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["subject"], "orders-value");
    assert_eq!(body["version"], 1);
    assert_eq!(body["id"], id);

    assert_eq!(r.get("/subjects").await.1, json!(["orders-value"]));
    let (_, latest) = r.get("/subjects/orders-value/versions/latest").await;
    assert_eq!(
        (latest["version"].as_i64(), latest["id"].as_i64()),
        (Some(1), Some(id))
    );
    let (_, by_number) = r.get("/subjects/orders-value/versions/1").await;
    assert_eq!(by_number, latest);

    // Stored in canonical form: parsing it back gives the same schema.
    let (s, body) = r.get(&format!("/schemas/ids/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    let stored = body["schema"].as_str().unwrap();
    assert_eq!(
        apache_avro::Schema::parse_str(stored).unwrap(),
        apache_avro::Schema::parse_str(V1).unwrap()
    );
    assert!(!stored.contains(' '), "canonical form is compact: {stored}");
    let (s, raw) = r.get(&format!("/schemas/ids/{id}/schema")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(raw["name"], "Event");
    assert_eq!(
        r.get(&format!("/schemas/ids/{id}/versions")).await.1,
        json!([{"subject": "orders-value", "version": 1}])
    );
    r.stop().await;
}

#[tokio::test]
async fn not_found_errors_use_confluent_codes() {
    let r = Registry::start(None).await;
    let (s, body) = r.get("/schemas/ids/4242").await;
    assert_eq!((s, error_code(&body)), (StatusCode::NOT_FOUND, 40403));
    let (s, body) = r.get("/subjects/missing/versions").await;
    assert_eq!((s, error_code(&body)), (StatusCode::NOT_FOUND, 40401));
    r.register("s", V1).await;
    let (s, body) = r.get("/subjects/s/versions/7").await;
    assert_eq!((s, error_code(&body)), (StatusCode::NOT_FOUND, 40402));
    let (s, body) = r.get("/subjects/s/versions/zero").await;
    assert_eq!(
        (s, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42202)
    );
    let (s, body) = r
        .post("/subjects/s", json!({ "schema": V2_OPTIONAL }))
        .await;
    assert_eq!((s, error_code(&body)), (StatusCode::NOT_FOUND, 40403));
    let (s, body) = r.register("s", r#"{"type":"record","name":"X"}"#).await;
    assert_eq!(
        (s, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42201)
    );
    let (s, body) = r.register("s", "not json").await;
    assert_eq!(
        (s, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42201)
    );
    let (s, body) = r
        .post(
            "/subjects/s/versions",
            json!({"schema": "{}", "schemaType": "PROTOBUF"}),
        )
        .await;
    assert_eq!(
        (s, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42201)
    );
    r.stop().await;
}

#[tokio::test]
async fn backward_compatibility_is_enforced_by_default() {
    let r = Registry::start(None).await;
    assert_eq!(
        r.get("/config").await.1,
        json!({"compatibilityLevel": "BACKWARD"})
    );
    r.register("c", V1).await;

    let (s, body) = r.register("c", V2_REQUIRED).await;
    assert_eq!((s, error_code(&body)), (StatusCode::CONFLICT, 409));
    assert!(
        body["message"].as_str().unwrap().contains("incompatible"),
        "{body}"
    );

    let (s, body) = r.register("c", V2_OPTIONAL).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(r.get("/subjects/c/versions").await.1, json!([1, 2]));

    // The compatibility endpoint answers without registering.
    let (s, body) = r
        .post(
            "/compatibility/subjects/c/versions/latest?verbose=true",
            json!({ "schema": V2_REQUIRED }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["is_compatible"], false);
    assert!(!body["messages"].as_array().unwrap().is_empty());
    let (_, body) = r
        .post(
            "/compatibility/subjects/c/versions/1",
            json!({ "schema": V2_OPTIONAL }),
        )
        .await;
    assert_eq!(body, json!({"is_compatible": true}));
    let (s, body) = r
        .post(
            "/compatibility/subjects/c/versions/9",
            json!({ "schema": V1 }),
        )
        .await;
    assert_eq!((s, error_code(&body)), (StatusCode::NOT_FOUND, 40402));
    r.stop().await;
}

#[tokio::test]
async fn config_levels_global_and_per_subject() {
    let r = Registry::start(None).await;
    r.register("n", V1).await;
    let (s, body) = r.get("/config/n").await;
    assert_eq!((s, error_code(&body)), (StatusCode::NOT_FOUND, 40408));
    assert_eq!(
        r.get("/config/n?defaultToGlobal=true").await.1["compatibilityLevel"],
        "BACKWARD"
    );

    assert_eq!(
        r.put("/config/n", json!({"compatibility": "NONE"})).await.1,
        json!({"compatibility": "NONE"})
    );
    assert_eq!(
        r.get("/config/n").await.1,
        json!({"compatibilityLevel": "NONE"})
    );
    assert_eq!(
        r.register("n", V2_REQUIRED).await.0,
        StatusCode::OK,
        "NONE accepts anything"
    );

    // FORWARD: old readers must read new data; dropping a required field breaks them.
    assert_eq!(
        r.put("/config/n", json!({"compatibility": "FORWARD"}))
            .await
            .0,
        StatusCode::OK
    );
    let only_amount = r#"{"type":"record","name":"Event","namespace":"t","fields":[{"name":"amount","type":"double"}]}"#;
    assert_eq!(r.register("n", only_amount).await.0, StatusCode::CONFLICT);

    let (s, body) = r.put("/config", json!({"compatibility": "SIDEWAYS"})).await;
    assert_eq!(
        (s, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42203)
    );
    assert_eq!(
        r.put("/config", json!({"compatibility": "FULL_TRANSITIVE"}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        r.get("/config").await.1["compatibilityLevel"],
        "FULL_TRANSITIVE"
    );
    assert_eq!(
        r.delete("/config/n").await.1,
        json!({"compatibilityLevel": "FORWARD"})
    );
    assert_eq!(
        r.get("/config/n?defaultToGlobal=true").await.1["compatibilityLevel"],
        "FULL_TRANSITIVE"
    );
    r.stop().await;
}

#[tokio::test]
async fn soft_and_permanent_delete() {
    let r = Registry::start(None).await;
    let id1 = r.register("d", V1).await.1["id"].clone();
    r.register("d", V2_OPTIONAL).await;
    assert_eq!(r.delete("/subjects/d/versions/2").await.1, json!(2));
    assert_eq!(r.get("/subjects/d/versions").await.1, json!([1]));
    assert_eq!(
        r.get("/subjects/d/versions?deleted=true").await.1,
        json!([1, 2])
    );
    let (s, body) = r.delete("/subjects/d?permanent=true").await;
    assert_eq!((s, error_code(&body)), (StatusCode::NOT_FOUND, 40405));
    assert_eq!(r.delete("/subjects/d").await.1, json!([1]));
    assert_eq!(r.get("/subjects").await.1, json!([]));
    assert_eq!(r.get("/subjects?deleted=true").await.1, json!(["d"]));
    // The id stays readable: data written with it must still decode.
    assert_eq!(
        r.get(&format!("/schemas/ids/{id1}")).await.0,
        StatusCode::OK
    );
    // Registering again after a soft delete reuses the id, in a new version.
    let (_, body) = r.register("d", V1).await;
    assert_eq!(body["id"], id1);
    assert_eq!(r.get("/subjects/d/versions").await.1, json!([3]));
    r.stop().await;
}

#[tokio::test]
async fn ids_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::start(Some(dir.path())).await;
    r.register("other-value", V2_REQUIRED).await;
    let id = r.register("p-value", V1).await.1["id"].as_i64().unwrap();
    let id2 = r.register("p-value", V2_OPTIONAL).await.1["id"]
        .as_i64()
        .unwrap();
    r.put("/config/p-value", json!({"compatibility": "FULL"}))
        .await;
    r.stop().await;

    let r = Registry::start(Some(dir.path())).await;
    let (s, body) = r.get(&format!("/schemas/ids/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        apache_avro::Schema::parse_str(body["schema"].as_str().unwrap()).unwrap(),
        apache_avro::Schema::parse_str(V1).unwrap()
    );
    assert_eq!(r.register("p-value", V1).await.1["id"], id);
    assert_eq!(
        r.get("/subjects/p-value/versions/latest").await.1["id"],
        id2
    );
    assert_eq!(
        r.get("/config/p-value").await.1["compatibilityLevel"],
        "FULL"
    );
    // New schemas continue after the highest id, never reusing one.
    let v3 = V2_OPTIONAL.replace("note", "memo");
    let (s, body) = r.register("p-value", &v3).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["id"].as_i64(), Some(id2 + 1));
    r.stop().await;
}

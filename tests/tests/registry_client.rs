//! Confluent's own Python client (`confluent_kafka.schema_registry`) against a
//! `lanes-schema-registry` process of the test's own: every `SchemaRegistryClient`
//! method, with the query strings it really sends (`deleted=False`, ...), Avro serde
//! against a pre-registered subject, and basic auth with `basic.auth.user.info`.
//!
//! The script checks that it called every public method of the installed client, so a
//! client upgrade that adds one fails here until it is served or listed as not served.
//! Not served (they answer 404): schema GUIDs, metadata lookups, associations.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lanes_tests::{Proc, bin, free_port, python};

/// Run as `python -c SCRIPT URL full` or `python -c SCRIPT URL auth USER:PASSWORD`;
/// prints a JSON summary as its last line.
const SCRIPT: &str = r##"import inspect, io, json, sys
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

url, mode = sys.argv[1], sys.argv[2]
done = []

def call(name, *args, **kwargs):
    done.append(name)
    return getattr(client, name)(*args, **kwargs)

def fails(status, code, name, *args, **kwargs):
    try:
        call(name, *args, **kwargs)
    except SchemaRegistryError as e:
        assert (e.http_status_code, e.error_code) == (status, code), (name, e)
        return
    raise AssertionError(f"{name} succeeded")

V1 = json.dumps({"type": "record", "name": "Pay", "namespace": "it", "fields": [
    {"name": "id", "type": "string"}, {"name": "amount", "type": "double"}]})
V2 = json.dumps({"type": "record", "name": "Pay", "namespace": "it", "fields": [
    {"name": "id", "type": "string"}, {"name": "amount", "type": "double"},
    {"name": "note", "type": ["null", "string"], "default": None}]})
BAD = json.dumps({"type": "record", "name": "Pay", "namespace": "it", "fields": [
    {"name": "id", "type": "long"}]})

if mode == "auth":
    user_info = sys.argv[3]
    client = SchemaRegistryClient({"url": url, "basic.auth.user.info": user_info})
    sid = client.register_schema("auth-value", Schema(V1, "AVRO"))
    assert client.get_subjects() == ["auth-value"]
    for conf in ({"url": url}, {"url": url, "basic.auth.user.info": user_info + "x"}):
        client = SchemaRegistryClient(conf)
        fails(401, 401, "get_subjects")
    print(json.dumps({"schema_id": sid}))
    sys.exit(0)

client = SchemaRegistryClient({"url": url})
subject = "pay-value"

# Register, read back, look up.
sid = call("register_schema", subject, Schema(V1, "AVRO"))
full = call("register_schema_full_response", subject, Schema(V1, "AVRO"), normalize_schemas=True)
assert full.schema_id == sid, full
assert json.loads(call("get_schema", sid).schema_str) == json.loads(V1)
assert call("get_schema_types") == ["AVRO"]
found = call("lookup_schema", subject, Schema(V1, "AVRO"))
assert (found.schema_id, found.subject, found.version) == (sid, subject, 1), found
found = call("lookup_schema", subject, Schema(V1, "AVRO"), normalize_schemas=True, deleted=True)
assert found.version == 1
fails(404, 40403, "lookup_schema", subject, Schema(V2, "AVRO"))

# Compatibility, then a second version.
assert call("test_compatibility", subject, Schema(V2, "AVRO")) is True
assert call("test_compatibility", subject, Schema(BAD, "AVRO"), version=1, verbose=True) is False
assert call("test_compatibility_all_versions", subject, Schema(V2, "AVRO"), normalize=True) is True
sid2 = call("register_schema", subject, Schema(V2, "AVRO"))
assert sid2 == sid + 1
fails(409, 409, "register_schema", subject, Schema(BAD, "AVRO"))
assert call("get_versions", subject) == [1, 2]
latest = call("get_latest_version", subject)
assert (latest.schema_id, latest.version) == (sid2, 2), latest
v1 = call("get_version", subject, 1)
assert (v1.schema_id, v1.version, v1.subject) == (sid, 1, subject), v1
assert call("get_referenced_by", subject, 1) == []
call("register_schema", "other-value", Schema(V1, "AVRO"))
assert call("get_subjects") == ["other-value", subject]
assert call("get_subjects", subject_prefix="pay") == [subject]
assert sorted(call("get_subjects_by_schema_id", sid)) == ["other-value", subject]
versions = call("get_schema_versions", sid)
assert sorted((v.subject, v.version) for v in versions) == [("other-value", 1), (subject, 1)], versions

# Config: global and per subject.
assert call("get_compatibility") == "BACKWARD"
assert call("set_compatibility", level="full") == {"compatibility": "FULL"}
assert call("set_compatibility", subject, "NONE") == {"compatibility": "NONE"}
assert call("get_compatibility", subject) == "NONE"
cfg = call("get_config", subject)
assert cfg.compatibility_level.value == "NONE", cfg
from confluent_kafka.schema_registry import ServerConfig, ConfigCompatibilityLevel
cfg = call("set_config", subject, ServerConfig(compatibility=ConfigCompatibilityLevel.FORWARD))
assert cfg == {"compatibility": "FORWARD"}, cfg
assert call("delete_config", subject).compatibility_level.value == "FORWARD"
fails(404, 40408, "get_compatibility", subject)
assert call("get_config").compatibility_level.value == "FULL"
assert call("delete_config").compatibility_level.value == "FULL"
assert call("get_compatibility") == "BACKWARD"

# Modes and contexts: this registry is one READWRITE context.
assert call("get_global_mode") == "READWRITE"
assert call("update_global_mode", "READWRITE") == "READWRITE"
fails(422, 42205, "update_global_mode", "READONLY")
assert call("get_mode", subject) == "READWRITE"
assert call("update_mode", subject, "READWRITE", force=True) == "READWRITE"
assert call("delete_mode", subject) == "READWRITE"
assert call("get_contexts") == ["."]

# Avro serde against a pre-registered subject, never registering.
topic = "payments"
ser_subject = f"{topic}-value"
ser_id = client.register_schema(ser_subject, Schema(V2, "AVRO"))
ser = AvroSerializer(client, V2, conf={"auto.register.schemas": False, "use.latest.version": True})
record = {"id": "p-1", "amount": 12.5, "note": "café"}
ctx = SerializationContext(topic, MessageField.VALUE)
data = ser(record, ctx)
assert data[0] == 0 and int.from_bytes(data[1:5], "big") == ser_id, data[:5]
reader = SchemaRegistryClient({"url": url})  # nothing cached
assert AvroDeserializer(reader)(data, ctx) == record
assert client.get_versions(ser_subject) == [1], "the serializer registered nothing"

# Deletes: soft, then permanent.
assert call("delete_version", subject, 2) == 2
assert call("get_versions", subject) == [1]
assert call("get_versions", subject, deleted=True) == [1, 2]
assert call("get_versions", subject, deleted_only=True) == [2]
assert call("get_version", subject, 2, deleted=True).schema_id == sid2
client.clear_caches()  # the client caches versions, deleted or not
fails(404, 40402, "get_version", subject, 2)
assert call("delete_version", subject, 2, permanent=True) == 2
assert call("delete_subject", subject) == [1]
assert subject not in call("get_subjects")
assert subject in call("get_subjects", deleted=True)
assert call("get_subjects", deleted_only=True) == [subject]
assert call("delete_subject", subject, permanent=True) == [1]
assert subject not in call("get_subjects", deleted=True)
fails(404, 40401, "get_latest_version", subject)
assert json.loads(call("get_schema", sid2).schema_str) == json.loads(V2), "ids outlive subjects"

# Endpoints this registry does not serve answer 404.
fails(404, 404, "get_schema_by_guid", "00000000-0000-0000-0000-000000000000")
fails(404, 404, "get_latest_with_metadata", "other-value", {"owner": "x"})
fails(404, 404, "get_associations_by_resource_name", "r", "ns")
fails(404, 404, "delete_associations", "rid")
try:
    from confluent_kafka.schema_registry import AssociationCreateOrUpdateRequest
    fails(404, 404, "create_association", AssociationCreateOrUpdateRequest(
        resource_name="r", resource_namespace="ns", resource_id="rid", resource_type="topic", associations=[]))
except ImportError:
    from confluent_kafka.schema_registry.common.schema_registry_client import AssociationCreateOrUpdateRequest
    fails(404, 404, "create_association", AssociationCreateOrUpdateRequest(
        resource_name="r", resource_namespace="ns", resource_id="rid", resource_type="topic", associations=[]))

# Client-side only: no request.
for name in ("clear_caches", "clear_latest_caches", "config"):
    call(name)
done.append("new_client"); SchemaRegistryClient.new_client({"url": url})
call("close")

# Every public method was called: a client upgrade that adds one fails here.
public = {n for n, _ in inspect.getmembers(SchemaRegistryClient, inspect.isfunction) if not n.startswith("_")}
missing = sorted(public - set(done))
assert not missing, f"not exercised: {missing}"
print(json.dumps({"methods": sorted(set(done)), "schema_id": ser_id}))
"##;

struct Registry {
    url: String,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

/// Starts the registry binary on a free port with its own data folder.
fn start(envs: &[(&str, &str)]) -> Registry {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let proc = Proc(
        Command::new(bin("lanes-schema-registry"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(dir.path())
            .envs(envs.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("lanes-schema-registry starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Registry {
        url: format!("http://127.0.0.1:{port}"),
        _proc: proc,
        _dir: dir,
    }
}

fn client(args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg("-c")
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("python printed a result"))
        .expect("JSON summary")
}

#[test]
fn every_client_method_and_avro_serde_work_against_the_registry() {
    let r = start(&[]);
    let got = client(&[&r.url, "full"]);
    let methods: Vec<&str> = got["methods"]
        .as_array()
        .expect("methods")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    for m in [
        "register_schema",
        "get_schema",
        "lookup_schema",
        "get_subjects",
        "delete_subject",
        "get_latest_version",
        "get_version",
        "get_versions",
        "delete_version",
        "set_compatibility",
        "get_compatibility",
        "test_compatibility",
    ] {
        assert!(methods.contains(&m), "{m} not exercised: {methods:?}");
    }
    assert!(got["schema_id"].as_u64().is_some(), "{got}");
}

#[test]
fn the_client_authenticates_with_basic_auth_user_info() {
    let r = start(&[("LANES_REGISTRY_BASIC_AUTH", "svc:pa:ss")]);
    let got = client(&[&r.url, "auth", "svc:pa:ss"]);
    assert_eq!(got["schema_id"], 1, "{got}");
}

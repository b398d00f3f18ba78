//! The committed OpenAPI document (`docs/openapi.json`) must be exactly what the code serves.
//! After an intended API change, regenerate it with `make openapi`.

use std::path::PathBuf;

#[test]
fn committed_openapi_matches_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let generated = shoal_controller::api::openapi_json() + "\n";
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("writing docs/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json differs from the API the code serves; run `make openapi` and review the diff"
    );
}

#[test]
fn every_route_is_documented() {
    let doc: serde_json::Value = serde_json::from_str(&shoal_controller::api::openapi_json()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/hosts", "get"),
        ("/v1/hosts/join-tokens", "post"),
        ("/v1/templates", "get"),
        ("/v1/vms/{name}/migrate", "post"),
        ("/v1/clusters/{name}/migrate", "post"),
        ("/v1/plan/migrate", "post"),
        ("/v1/migrations", "get"),
        ("/v1/templates", "post"),
        ("/v1/agents/{name}/templates/{template}/{file}", "get"),
        ("/v1/vms/{name}/{action}", "post"),
        ("/v1/vms/{name}/console", "get"),
        ("/v1/clusters/{name}/{action}", "post"),
        ("/v1/templates/{name}", "delete"),
        ("/v1/profiles", "post"),
        ("/v1/profiles/{name}", "delete"),
        ("/v1/clusters", "post"),
        ("/v1/clusters/{name}/scale", "post"),
        ("/v1/clusters/{name}", "delete"),
        ("/v1/vms", "get"),
        ("/v1/vms/{name}", "get"),
        ("/v1/operations/{id}", "get"),
        ("/v1/agents/register", "post"),
        ("/v1/agents/{name}/heartbeat", "post"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} undocumented"
        );
    }
    for schema in ["Vm", "Host", "Operation", "ErrorBody", "ClusterView"] {
        assert!(
            doc["components"]["schemas"].get(schema).is_some(),
            "schema {schema} missing"
        );
    }
}

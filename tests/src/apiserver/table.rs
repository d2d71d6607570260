//! Server-side printing: `meta.k8s.io` `Table` answers for `Accept: application/json;as=Table`
//! (what `kubectl get` asks for), and `PartialObjectMetadata` for metadata-only clients.

use std::time::SystemTime;

use serde_json::{json, Map, Value};

use super::resources::{ResId, RESOURCES};
use super::store::parse_rfc3339;

/// What a `Table` row carries as `object` (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IncludeObject {
    None,
    Metadata,
    Object,
}

/// `PartialObjectMetadata` of an object (apiVersion `meta.k8s.io/<v>`).
pub(crate) fn partial(obj: &Value, meta_version: &str) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": format!("meta.k8s.io/{meta_version}"),
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// Kubernetes' `duration.HumanDuration` (the `AGE` column).
pub(crate) fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        return if d == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{d}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn age(ts: Option<&Value>) -> String {
    match ts.and_then(Value::as_str).and_then(parse_rfc3339) {
        Some(t) => {
            let secs = match SystemTime::now().duration_since(t) {
                Ok(d) => d.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            };
            human_duration(secs)
        }
        None => "<unknown>".into(),
    }
}

fn s<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn or_none(v: String) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v
    }
}

fn pod_ready(obj: &Value) -> String {
    let total = obj
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = obj
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map_or(0, |c| {
            c.iter()
                .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                .count()
        });
    format!("{ready}/{total}")
}

fn pod_status(obj: &Value) -> String {
    if obj.pointer("/metadata/deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let reason = s(obj, "/status/reason");
    if !reason.is_empty() {
        return reason.into();
    }
    let waiting = obj
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .and_then(|c| {
            c.iter()
                .find_map(|c| c.pointer("/state/waiting/reason").and_then(Value::as_str))
        });
    waiting
        .map(str::to_string)
        .unwrap_or_else(|| match s(obj, "/status/phase") {
            "" => "Pending".into(),
            p => p.into(),
        })
}

fn pod_restarts(obj: &Value) -> String {
    let n: i64 = obj
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map_or(0, |c| {
            c.iter()
                .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                .sum()
        });
    n.to_string()
}

fn node_status(obj: &Value) -> String {
    let ready = obj
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .map(|c| c["status"] == "True");
    let mut status = match ready {
        Some(true) => "Ready".to_string(),
        Some(false) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if obj.pointer("/spec/unschedulable") == Some(&Value::Bool(true)) {
        status.push_str(",SchedulingDisabled");
    }
    status
}

fn node_roles(obj: &Value) -> String {
    let roles: Vec<&str> = obj
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|l| {
            l.keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                .collect()
        })
        .unwrap_or_default();
    or_none(roles.join(","))
}

fn node_internal_ip(obj: &Value) -> String {
    obj.pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
        .and_then(|a| a["address"].as_str())
        .map_or_else(|| "<none>".into(), str::to_string)
}

fn svc_ports(obj: &Value) -> String {
    let ports: Vec<String> = obj
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let port = p["port"].as_i64().unwrap_or_default();
                    let proto = p["protocol"].as_str().unwrap_or("TCP");
                    match p["nodePort"].as_i64() {
                        Some(np) => format!("{port}:{np}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    or_none(ports.join(","))
}

fn svc_selector(obj: &Value) -> String {
    let sel: Vec<String> = obj
        .pointer("/spec/selector")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    or_none(sel.join(","))
}

fn eps_ports(obj: &Value) -> String {
    let ports: Vec<String> = obj
        .get("ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["port"].as_i64().map(|p| p.to_string()))
                .collect()
        })
        .unwrap_or_default();
    if ports.is_empty() {
        "<unset>".into()
    } else {
        ports.join(",")
    }
}

fn eps_endpoints(obj: &Value) -> String {
    let addrs: Vec<&str> = obj
        .get("endpoints")
        .and_then(Value::as_array)
        .map(|es| {
            es.iter()
                .filter_map(|e| e["addresses"].as_array())
                .flatten()
                .filter_map(Value::as_str)
                .collect()
        })
        .unwrap_or_default();
    if addrs.is_empty() {
        return "<unset>".into();
    }
    let shown = addrs.iter().take(3).copied().collect::<Vec<_>>().join(",");
    if addrs.len() > 3 {
        format!("{shown} + {} more...", addrs.len() - 3)
    } else {
        shown
    }
}

/// A dotted-path column (`.spec.hosts`): strings as they are, other values as JSON, as the
/// apiextensions table convertor prints a JSONPath.
fn path_cell(obj: &Value, path: &str) -> Value {
    let pointer = path.replace('.', "/");
    match obj.pointer(&pointer) {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) => json!(s),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => v.clone(),
        Some(v) => json!(v.to_string()),
    }
}

fn cell(obj: &Value, path: &str, typ: &str) -> Value {
    let text = match path {
        "@pod-ready" => pod_ready(obj),
        "@pod-status" => pod_status(obj),
        "@pod-restarts" => pod_restarts(obj),
        "@node-status" => node_status(obj),
        "@node-roles" => node_roles(obj),
        "@node-internal-ip" => node_internal_ip(obj),
        "@svc-type" => match s(obj, "/spec/type") {
            "" => "ClusterIP".into(),
            t => t.into(),
        },
        "@svc-external-ip" => {
            let ips: Vec<&str> = obj
                .pointer("/spec/externalIPs")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            or_none(ips.join(","))
        }
        "@svc-ports" => svc_ports(obj),
        "@svc-selector" => svc_selector(obj),
        "@eps-ports" => eps_ports(obj),
        "@eps-endpoints" => eps_endpoints(obj),
        "@event-object" => format!(
            "{}/{}",
            s(obj, "/involvedObject/kind").to_lowercase(),
            s(obj, "/involvedObject/name")
        ),
        "@created-at" => s(obj, "/metadata/creationTimestamp").into(),
        p if typ == "date" => age(obj.pointer(&p.replace('.', "/"))),
        p => {
            let v = path_cell(obj, p);
            return match v {
                Value::Null if p == ".status.podIP" || p == ".spec.nodeName" => json!("<none>"),
                Value::Null if p == ".spec.clusterIP" => json!("None"),
                v => v,
            };
        }
    };
    json!(text)
}

/// A `Table` of `objects` of type `res`. `meta_version`: `v1` or `v1beta1`.
pub(crate) fn table(
    res: ResId,
    objects: &[&Value],
    list_meta: Value,
    include: IncludeObject,
    meta_version: &str,
    present: &dyn Fn(&Value) -> Value,
) -> Value {
    let r = &RESOURCES[res];
    let mut columns = vec![json!({
        "name": "Name",
        "type": "string",
        "format": "name",
        "description": "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
        "priority": 0,
    })];
    for c in r.columns {
        columns.push(json!({
            "name": c.name,
            "type": c.typ,
            "format": "",
            "description": c.description,
            "priority": c.priority,
        }));
    }
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![json!(s(o, "/metadata/name"))];
            cells.extend(r.columns.iter().map(|c| cell(o, c.path, c.typ)));
            let mut row = Map::new();
            row.insert("cells".into(), json!(cells));
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row.insert("object".into(), partial(o, meta_version));
                }
                IncludeObject::Object => {
                    row.insert("object".into(), present(o));
                }
            }
            Value::Object(row)
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": format!("meta.k8s.io/{meta_version}"),
        "metadata": list_meta,
        "columnDefinitions": columns,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(130), "2m10s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(50 * 3600), "2d2h");
    }

    #[test]
    fn pod_columns() {
        let pod = json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "containerStatuses": [{"ready": true, "restartCount": 2}, {"ready": false, "restartCount": 1}]}
        });
        assert_eq!(pod_ready(&pod), "1/2");
        assert_eq!(pod_status(&pod), "Running");
        assert_eq!(pod_restarts(&pod), "3");
    }
}

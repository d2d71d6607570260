//! Which application protocol a port declares, as Istio decides it (`pkg/config/kube`
//! `ConvertProtocol`, `pkg/config/protocol` `Parse`): a Service port's `appProtocol` when set,
//! else its name's prefix before the first `-`; a ServiceEntry port's `protocol`. Pure.

use crate::registry::ServicePort;

/// A declared protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum AppProtocol {
    /// HTTP/1.1 (`http`, `http_proxy`, `grpc-web`, `kubernetes.io/ws`).
    Http1,
    /// HTTP/2 over cleartext (`http2`, `kubernetes.io/h2c`).
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Declared, but not HTTP (`tcp`, `tls`, `https`, `mongo`, `redis`, `mysql`,
    /// `kubernetes.io/wss`, UDP): forward as TCP, do not sniff.
    Opaque,
}

impl AppProtocol {
    /// Whether requests on this port are HTTP (routed per request).
    pub fn is_http(self) -> bool {
        !matches!(self, AppProtocol::Opaque)
    }
}

/// A Service port's declared protocol; `None`: not declared (the data path sniffs).
///
/// `appProtocol` wins over the name (Kubernetes' `kubernetes.io/h2c`, `kubernetes.io/ws`,
/// `kubernetes.io/wss` included); a name counts by its prefix before the first `-` (`http-web`,
/// `grpc`, but not `httpbin`), `grpc-web` as a whole; case does not matter. UDP ports are opaque.
pub fn declared(port: &ServicePort) -> Option<AppProtocol> {
    if port.protocol == "UDP" || port.protocol == "SCTP" {
        return Some(AppProtocol::Opaque);
    }
    let name = match (&port.app_protocol, &port.name) {
        (Some(app), _) => match app.as_str() {
            "kubernetes.io/h2c" => return Some(AppProtocol::Http2),
            "kubernetes.io/ws" => return Some(AppProtocol::Http1),
            "kubernetes.io/wss" => return Some(AppProtocol::Opaque),
            other => other,
        },
        (None, Some(name)) => name.as_str(),
        (None, None) => return None,
    };
    if name.len() >= 8 && name[..8].eq_ignore_ascii_case("grpc-web") {
        return Some(AppProtocol::Http1);
    }
    let prefix = name.split_once('-').map_or(name, |(p, _)| p);
    parse(prefix)
}

/// A ServiceEntry port's `protocol` (`HTTP`, `HTTP2`, `GRPC`, `TCP`, …); `None` when empty or
/// unknown (then the data path sniffs).
pub fn declared_by_name(protocol: &str) -> Option<AppProtocol> {
    parse(protocol)
}

/// Istio's `protocol.Parse`, reduced to what the data path needs.
fn parse(s: &str) -> Option<AppProtocol> {
    let p = s.to_ascii_lowercase();
    Some(match p.as_str() {
        "http" | "http_proxy" | "grpc-web" => AppProtocol::Http1,
        "http2" => AppProtocol::Http2,
        "grpc" => AppProtocol::Grpc,
        "tcp" | "udp" | "tls" | "https" | "mongo" | "redis" | "mysql" => AppProtocol::Opaque,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::TargetPort;

    fn port(name: Option<&str>, app: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            port: 80,
            target_port: TargetPort::Number(80),
            protocol: "TCP".into(),
            app_protocol: app.map(str::to_string),
        }
    }

    #[test]
    fn app_protocol_first_then_the_name_prefix() {
        use AppProtocol::*;
        let cases = [
            (None, Some("http"), Some(Http1)),
            (None, Some("HTTP"), Some(Http1)),
            (None, Some("http2"), Some(Http2)),
            (None, Some("grpc"), Some(Grpc)),
            (None, Some("kubernetes.io/h2c"), Some(Http2)),
            (None, Some("kubernetes.io/ws"), Some(Http1)),
            (None, Some("kubernetes.io/wss"), Some(Opaque)),
            (None, Some("custom"), None),
            (Some("grpc"), Some("http"), Some(Http1)),
            (Some("http"), None, Some(Http1)),
            (Some("http-web"), None, Some(Http1)),
            (Some("http2-api"), None, Some(Http2)),
            (Some("grpc-api"), None, Some(Grpc)),
            (Some("grpc-web"), None, Some(Http1)),
            (Some("grpc-web-x"), None, Some(Http1)),
            (Some("GRPC-x"), None, Some(Grpc)),
            (Some("httpbin"), None, None),
            (Some("http2x"), None, None),
            (Some("tcp-db"), None, Some(Opaque)),
            (Some("tls"), None, Some(Opaque)),
            (Some("web"), None, None),
            (None, None, None),
        ];
        for (name, app, want) in cases {
            assert_eq!(declared(&port(name, app)), want, "{name:?} {app:?}");
        }
        let mut udp = port(Some("http"), None);
        udp.protocol = "UDP".into();
        assert_eq!(declared(&udp), Some(Opaque));
        assert_eq!(declared_by_name("HTTP2"), Some(Http2));
        assert_eq!(declared_by_name("GRPC"), Some(Grpc));
        assert_eq!(declared_by_name("TLS"), Some(Opaque));
        assert_eq!(declared_by_name(""), None);
    }
}

//! Responses weft makes itself, and the Envoy response flags that say why (pure).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::route::AbortError;

/// Envoy's response flags weft sets (`%RESPONSE_FLAGS%`, short form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// No route configured for the request.
    NoRoute,
    /// No healthy upstream host.
    NoHealthyUpstream,
    /// Upstream connection failure.
    UpstreamConnectionFailure,
    /// The upstream reset the stream.
    UpstreamRemoteReset,
    /// The upstream connection ended.
    UpstreamConnectionTermination,
    /// The client sent a malformed request.
    DownstreamProtocolError,
    /// The client went away before the response ended.
    DownstreamConnectionTermination,
    /// The upstream did not answer within the route's timeout.
    UpstreamRequestTimeout,
    /// A rule's fault aborted the request (its answer is [`aborted`]).
    FaultInjected,
    /// A circuit breaker of the destination was at its limit.
    UpstreamOverflow,
}

impl Flag {
    /// The short form, as in Envoy's access log.
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::NoRoute => "NR",
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamConnectionFailure => "UF",
            Flag::UpstreamRemoteReset => "UR",
            Flag::UpstreamConnectionTermination => "UC",
            Flag::DownstreamProtocolError => "DPE",
            Flag::DownstreamConnectionTermination => "DC",
            Flag::UpstreamRequestTimeout => "UT",
            Flag::FaultInjected => "FI",
            Flag::UpstreamOverflow => "UO",
        }
    }

    /// The response the client gets, with Envoy's status and body.
    pub fn response(self) -> Response<Bytes> {
        let (status, body) = match self {
            Flag::NoRoute => (StatusCode::NOT_FOUND, ""),
            Flag::NoHealthyUpstream => (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
            Flag::UpstreamConnectionFailure => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            ),
            Flag::UpstreamRemoteReset => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: remote reset",
            ),
            Flag::UpstreamConnectionTermination => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            ),
            Flag::UpstreamRequestTimeout => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
            }
            Flag::UpstreamOverflow => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            ),
            Flag::DownstreamProtocolError | Flag::DownstreamConnectionTermination => {
                (StatusCode::BAD_REQUEST, "")
            }
            Flag::FaultInjected => return aborted(AbortError::Http(StatusCode::SERVICE_UNAVAILABLE)),
        };
        text(status, body)
    }
}

/// What Envoy's fault filter answers when it aborts a request.
pub const FAULT_ABORT: &str = "fault filter abort";

/// The answer to a request a fault aborted, as Envoy's fault filter gives it: the status with
/// `fault filter abort`, or for a gRPC status, HTTP 200 with only `grpc-status` and
/// `grpc-message` (a trailers-only gRPC response).
pub fn aborted(error: AbortError) -> Response<Bytes> {
    match error {
        AbortError::Http(status) => text(status, FAULT_ABORT),
        AbortError::Grpc(code) => {
            let mut r = Response::new(Bytes::new());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert("grpc-message", HeaderValue::from_static(FAULT_ABORT));
            r
        }
    }
}

/// The body of a request an AuthorizationPolicy denies (Envoy's RBAC filter; no flag).
pub const RBAC_DENIED: &str = "RBAC: access denied";

/// `403 RBAC: access denied`.
pub fn denied() -> Response<Bytes> {
    text(StatusCode::FORBIDDEN, RBAC_DENIED)
}

/// A plain-text response.
pub fn text(status: StatusCode, body: &str) -> Response<Bytes> {
    let mut r = Response::new(Bytes::copy_from_slice(body.as_bytes()));
    *r.status_mut() = status;
    if !body.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_have_envoys_statuses_and_bodies() {
        let r = Flag::NoHealthyUpstream.response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.body(), "no healthy upstream");
        assert_eq!(Flag::NoRoute.response().status(), 404);
        assert!(Flag::NoRoute.response().body().is_empty());
        assert_eq!(Flag::UpstreamConnectionFailure.as_str(), "UF");
        let t = Flag::UpstreamRequestTimeout.response();
        assert_eq!(
            (t.status().as_u16(), t.body().as_ref()),
            (504, &b"upstream request timeout"[..])
        );
        assert_eq!(Flag::UpstreamRequestTimeout.as_str(), "UT");
        let a = aborted(AbortError::Http(StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(
            (a.status().as_u16(), a.body().as_ref()),
            (500, &b"fault filter abort"[..])
        );
        let g = aborted(AbortError::Grpc(14));
        assert_eq!(g.status(), 200, "gRPC carries its status in grpc-status");
        assert_eq!(g.headers()["grpc-status"], "14");
        assert_eq!(g.headers()["content-type"], "application/grpc");
        assert!(g.body().is_empty());
        assert!(
            std::str::from_utf8(Flag::UpstreamConnectionFailure.response().body())
                .unwrap()
                .ends_with("connection failure")
        );
        assert_eq!(denied().status(), 403);
        assert_eq!(denied().body(), RBAC_DENIED);
    }
}

//! The admin API client the CLI uses: one GET, answered with a typed body or an error that says
//! what to do about it (never a URL).

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::api::{window_param, GraphEdge, StatQuery, StatRow};

/// Which node to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Unix socket; `given` when the user named it (flag or environment), not the default.
    Socket {
        path: PathBuf,
        given: bool,
    },
    Tcp(SocketAddr),
}

/// A client of one node's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    target: Target,
}

impl AdminClient {
    pub fn new(target: Target) -> AdminClient {
        AdminClient { target }
    }

    /// GET `path` (with its query); non-200 answers become errors with the body's text.
    pub async fn get(&self, path: &str) -> anyhow::Result<Response<Incoming>> {
        let req = Request::get(path)
            .header(hyper::header::HOST, "weft-admin")
            .body(Empty::<Bytes>::new())?;
        let resp = match &self.target {
            Target::Tcp(addr) => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| {
                        format!("cannot reach the admin API at {addr}: is `weft node` running?")
                    })?;
                send(s, req).await?
            }
            Target::Socket { path, given } => {
                let s = connect_socket(path, *given).await?;
                send(s, req).await?
            }
        };
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            bail!(
                "the node refused the request ({status}): {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        Ok(resp)
    }

    /// GET `path` and decode its JSON body.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let body = self
            .get(path)
            .await?
            .into_body()
            .collect()
            .await
            .context("reading the node's answer")?
            .to_bytes();
        serde_json::from_slice(&body)
            .context("the node's answer is not what this weft understands (a different version?)")
    }

    /// `/stat`: the golden signals of the calls into each target `query` asks for.
    pub async fn stat(&self, query: &StatQuery) -> anyhow::Result<Vec<StatRow>> {
        self.get_json(&format!("/stat?{}", query.to_query())).await
    }

    /// `/graph`: who called whom over `window`.
    pub async fn graph(&self, window: std::time::Duration) -> anyhow::Result<Vec<GraphEdge>> {
        self.get_json(&format!("/graph?window={}", window_param(window)))
            .await
    }
}

async fn connect_socket(path: &PathBuf, given: bool) -> anyhow::Result<tokio::net::UnixStream> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            bail!("{shown} is not a Unix socket: --admin-socket names the socket `weft node` serves its admin API on (`weft node --admin-socket`)")
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound && given => {
            bail!("the admin socket {shown} does not exist: is `weft node` running with `--admin-socket {shown}`?")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("no weft node here: the default admin socket {shown} does not exist. Start `weft node`, or point --admin-socket (or WEFT_ADMIN_SOCKET) at its socket, or --admin-address at its admin address")
        }
        Err(e) => return Err(anyhow!(e).context(format!("cannot use the admin socket {shown}"))),
    }
    tokio::net::UnixStream::connect(path).await.map_err(|e| {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            anyhow!("nothing answers on the admin socket {shown}: `weft node` is not running (the socket is left from an earlier run)")
        } else {
            anyhow!(e).context(format!("connecting to the admin socket {shown}"))
        }
    })
}

async fn send<S>(stream: S, req: Request<Empty<Bytes>>) -> anyhow::Result<Response<Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("talking to the admin API")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .context("talking to the admin API")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn error_of(target: Target) -> String {
        AdminClient::new(target)
            .get("/status")
            .await
            .map(drop)
            .unwrap_err()
            .to_string()
    }

    #[tokio::test]
    async fn a_missing_default_socket_names_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let e = error_of(Target::Socket {
            path: path.clone(),
            given: false,
        })
        .await;
        assert!(
            e.contains("--admin-socket") && e.contains("WEFT_ADMIN_SOCKET"),
            "{e}"
        );
        let e = error_of(Target::Socket { path, given: true }).await;
        assert!(e.contains("does not exist"), "{e}");
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_named_as_such() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = error_of(Target::Socket {
            path: f.path().into(),
            given: true,
        })
        .await;
        assert!(e.contains("is not a Unix socket"), "{e}");
    }

    /// A node that serves golden signals and nothing else.
    struct GoldenView;

    impl crate::admin::server::NodeView for GoldenView {
        fn workloads(&self) -> Vec<crate::admin::api::WorkloadInfo> {
            Vec::new()
        }
        fn config_dump(&self) -> crate::admin::api::ConfigDump {
            unimplemented!()
        }
        fn status(&self) -> crate::admin::api::Status {
            unimplemented!()
        }
        fn stats(&self) -> crate::admin::api::Stats {
            crate::admin::api::Stats::default()
        }
        fn certs(&self) -> Vec<crate::admin::api::CertInfo> {
            Vec::new()
        }
        fn ready(&self) -> Result<(), String> {
            Ok(())
        }
        fn flows(
            &self,
            _: &crate::admin::api::FlowFilter,
        ) -> Vec<std::sync::Arc<crate::admin::api::Flow>> {
            Vec::new()
        }
        fn follow_flows(
            &self,
            _: &crate::admin::api::FlowFilter,
        ) -> (
            Vec<std::sync::Arc<crate::admin::api::Flow>>,
            tokio::sync::broadcast::Receiver<std::sync::Arc<crate::admin::api::Flow>>,
        ) {
            unimplemented!()
        }
        fn stat(&self, query: &StatQuery) -> Vec<StatRow> {
            // Echoes the query it got in the row.
            vec![StatRow {
                namespace: query.namespace.clone().unwrap_or_default(),
                name: query.by.to_string(),
                kind: "Deployment".into(),
                meshed: true,
                pods: 1,
                requests: 3,
                rps: 0.05,
                success_rate: Some(1.0),
                p50_ms: Some(1.0),
                p95_ms: None,
                p99_ms: None,
                tcp_connections: 0,
                tcp_opened: 0,
                tcp_bytes_sent_per_sec: 0.0,
                tcp_bytes_received_per_sec: 0.0,
                window_seconds: query.window.as_secs_f64(),
            }]
        }
        fn graph(&self, window: std::time::Duration) -> Vec<GraphEdge> {
            vec![GraphEdge {
                source: "a/client".into(),
                destination: "b/server".into(),
                service: None,
                protocol: crate::admin::api::EdgeProtocol::Tcp,
                requests: 0,
                rps: 0.0,
                error_rate: None,
                mtls: true,
                tcp_connections: 2,
                tcp_opened: 2,
                tcp_bytes_sent_per_sec: 1.5,
                tcp_bytes_received_per_sec: 2.5,
                window_seconds: window.as_secs_f64(),
            }]
        }
    }

    async fn golden_node() -> AdminClient {
        let app = crate::admin::server::router(std::sync::Arc::new(GoldenView));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        AdminClient::new(Target::Tcp(addr))
    }

    #[tokio::test]
    async fn stat_and_graph_carry_their_query() {
        use crate::admin::api::StatBy;
        use std::time::Duration;
        let client = golden_node().await;
        let rows = client
            .stat(&StatQuery {
                by: StatBy::Svc,
                namespace: Some("shop".into()),
                window: Duration::from_secs(150),
            })
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].namespace.as_str(), rows[0].name.as_str()),
            ("shop", "svc")
        );
        assert_eq!(rows[0].window_seconds, 150.0);
        assert_eq!(rows[0].p95_ms, None);
        let edges = client.graph(Duration::from_secs(600)).await.unwrap();
        assert_eq!(edges[0].window_seconds, 600.0);
        assert_eq!(edges[0].tcp_connections, 2);
        // Defaults: deploy, every namespace, 1m.
        let rows: Vec<StatRow> = client.get_json("/stat").await.unwrap();
        assert_eq!(
            (rows[0].name.as_str(), rows[0].window_seconds),
            ("deploy", 60.0)
        );
        let e = client.get("/stat?by=rs").await.map(drop).unwrap_err();
        assert!(e.to_string().contains("unknown resource \"rs\""), "{e}");
        let e = client.get("/graph?window=1h").await.map(drop).unwrap_err();
        assert!(e.to_string().contains("between 10s and 10m"), "{e}");
    }

    #[tokio::test]
    async fn refusals_show_the_node_s_words_not_a_url() {
        use axum::http::StatusCode as S;
        let app = axum::Router::new().route(
            "/flows",
            axum::routing::get(|| async { (S::BAD_REQUEST, "unknown verdict \"x\"\n") }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        let e = AdminClient::new(Target::Tcp(addr))
            .get("/flows?verdict=x")
            .await
            .map(drop)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "the node refused the request (400 Bad Request): unknown verdict \"x\""
        );
    }
}

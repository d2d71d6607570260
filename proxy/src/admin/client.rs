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

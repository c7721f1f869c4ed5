//! What the WebSocket tests share: a client that sends text and reads
//! server messages, errors and closes (the server: `common::listen`).

use std::net::SocketAddr;
use std::time::Duration;

use clubcast_protocol::signal::{ErrorCode, ServerMsg};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a read waits.
pub const WAIT: Duration = Duration::from_secs(5);

pub async fn connect(addr: SocketAddr) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connects");
    ws
}

pub async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// The next server message; panics on close or timeout.
pub async fn recv(ws: &mut Ws) -> ServerMsg {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("socket open")
            .expect("no transport error");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("valid ServerMsg"),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// Reads until the server closes; the close code and reason.
pub async fn closed(ws: &mut Ws) -> Option<(CloseCode, String)> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("closes in time")
        {
            Some(Ok(Message::Close(c))) => return c.map(|c| (c.code, c.reason.to_string())),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// The code of the next message, which must be an error.
pub async fn error_code(ws: &mut Ws) -> ErrorCode {
    match recv(ws).await {
        ServerMsg::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

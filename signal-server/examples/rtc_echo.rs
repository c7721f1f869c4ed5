//! Interop check against a real browser: serves a page whose JavaScript opens an
//! `RTCPeerConnection` with a "clubcast" data channel, POSTs its offer (after gathering) to
//! `/offer`, applies our answer, sends 50 blocks of 16 KiB (under the 1 MiB send bound, so the
//! echo never has to drop one), checks the echoes and POSTs a JSON verdict to `/result`. The
//! server side is the `rtc` wrapper as answerer, echoing.
//!
//! ```text
//! cargo run --release -p clubcast-server --example rtc_echo -- [/usr/bin/chromium [extra flags..]]
//! ```
//!
//! With a browser path it launches that browser headless on the page, prints the verdict and
//! exits (non-zero on failure or after 90 s). Without one it serves until killed, for a manual
//! check in any browser.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::Html;
use axum::routing::{get, post};
use axum::{Json, Router};
use clubcast_server::rtc::{
    Gathering, Handshake, Link, LinkEvent, RtcConfig, SessionDescription, Transport, WebrtcRs,
};
use tokio::sync::mpsc;

const PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>rtc echo</title>
<pre id="log">running</pre>
<script>
const N = 50, SIZE = 16 * 1024;
const log = (m) => { document.getElementById("log").textContent += "\n" + m; };
const post = (path, v) => fetch(path, {method: "POST", body: JSON.stringify(v),
                                       headers: {"content-type": "application/json"}});
const report = (r) => post("/result", r);
window.onerror = (e) => report({ok: false, error: String(e)});
setTimeout(() => report({ok: false, error: "timeout in page"}), 60000);
window.onunhandledrejection = (e) => report({ok: false, error: String(e.reason)});
(async () => {
  const t0 = performance.now();
  const pc = new RTCPeerConnection();
  const dc = pc.createDataChannel("clubcast");
  dc.binaryType = "arraybuffer";
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
    setTimeout(done, 5000);
  });
  const offer = pc.localDescription;
  const candidates = offer.sdp.split("\r\n").filter((l) => l.startsWith("a=candidate"));
  const res = await post("/offer", offer);
  if (!res.ok) return report({ok: false, error: "offer refused: " + await res.text()});
  const answer = await res.json();
  await pc.setRemoteDescription(answer);
  let tOpen = 0, echoed = 0, bad = 0;
  dc.onmessage = (ev) => {
    const v = new Uint8Array(ev.data);
    const seq = (v[0] << 8) | v[1];
    if (v.length !== SIZE || seq !== echoed || v[SIZE - 1] !== (seq & 0xff)) bad++;
    echoed++;
    if (echoed === N) {
      const pair = pc.sctp && pc.sctp.transport && pc.sctp.transport.iceTransport
        && pc.sctp.transport.iceTransport.getSelectedCandidatePair
        ? pc.sctp.transport.iceTransport.getSelectedCandidatePair() : null;
      report({ok: bad === 0, open_ms: tOpen, total_ms: performance.now() - t0, echoed, bad,
              browser_candidates: candidates,
              answer_candidates: answer.sdp.split("\r\n").filter((l) => l.startsWith("a=candidate")),
              selected: pair ? {local: pair.local.candidate, remote: pair.remote.candidate} : null,
              ua: navigator.userAgent});
    }
  };
  dc.onopen = () => {
    tOpen = performance.now() - t0;
    for (let seq = 0; seq < N; seq++) {
      const v = new Uint8Array(SIZE);
      v[0] = seq >> 8; v[1] = seq & 0xff; v[SIZE - 1] = seq & 0xff;
      dc.send(v);
    }
  };
  pc.onconnectionstatechange = () => {
    log("state " + pc.connectionState);
    if (pc.connectionState === "failed") report({ok: false, error: "connection failed", candidates});
  };
})();
</script>"#;

#[derive(Clone)]
struct App {
    stack: Arc<WebrtcRs>,
    results: mpsc::Sender<serde_json::Value>,
}

async fn offer(
    State(app): State<App>,
    Json(offer): Json<SessionDescription>,
) -> Result<Json<SessionDescription>, String> {
    let Handshake {
        link,
        local,
        mut events,
    } = app.stack.accept(offer).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                LinkEvent::Open => println!("server: channel open"),
                LinkEvent::Message(message) => {
                    if let Err(error) = link.try_send(message) {
                        println!("server: echo refused: {error}");
                    }
                }
                LinkEvent::Closed(reason) => println!("server: closed ({reason:?})"),
                _ => {}
            }
        }
    });
    Ok(Json(local))
}

async fn result(State(app): State<App>, Json(verdict): Json<serde_json::Value>) {
    let _ = app.results.try_send(verdict);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let stack = Arc::new(WebrtcRs::new(RtcConfig {
        gathering: Gathering::Complete,
        ..RtcConfig::default()
    }));
    let (results, mut verdicts) = mpsc::channel(4);
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/offer", post(offer))
        .route("/result", post(result))
        .with_state(App { stack, results });
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let url = format!("http://{}/", listener.local_addr()?);
    println!("serving {url}");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut args = std::env::args().skip(1);
    let Some(browser) = args.next() else {
        while let Some(verdict) = verdicts.recv().await {
            println!("{verdict:#}");
        }
        return Ok(());
    };
    let profile = std::env::temp_dir().join(format!("rtc-echo-{}", std::process::id()));
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let verdict = tokio::time::timeout(Duration::from_secs(90), verdicts.recv()).await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&profile);
    match verdict {
        Ok(Some(verdict)) => {
            println!("{verdict:#}");
            if verdict["ok"] == serde_json::Value::Bool(true) {
                Ok(())
            } else {
                Err("browser reported failure".into())
            }
        }
        _ => Err("no verdict from the browser within 90 s".into()),
    }
}

//! Text frames become typed [`ClientMsg`]s, or a wire error with a clear message.
//!
//! Most of what a busy server reads is `signal` (SDP and ICE relayed between
//! peers), so that type has a path of its own: one pass over the text into the
//! flat shape of a `signal` message, with no intermediate buffering. Anything
//! that path does not take (another type, a bad version, a field it cannot
//! read) goes through the general path, which tells a bad shape from an
//! unknown type or version and names the problem. The signal path accepts a
//! text only if the general path gives the same message for it, so answers to
//! bad input are the general path's alone.

use clubcast_protocol::signal::{
    ClientMsg, ErrorCode, PeerId, SignalData, MAX_SIGNAL_MESSAGE, SIGNAL_VERSION,
};
use serde::Deserialize;

/// Message types a client may send.
const CLIENT_TYPES: [&str; 6] = [
    "join",
    "signal",
    "heartbeat",
    "bid",
    "link_failed",
    "report",
];

/// Just enough of a message to tell a bad shape from an unknown type or version.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    ty: std::borrow::Cow<'a, str>,
    #[serde(default)]
    v: Option<u64>,
}

/// Parses a text message into a typed message or a wire error.
pub(crate) fn parse(text: &str) -> Result<ClientMsg, (ErrorCode, String)> {
    if text.len() > MAX_SIGNAL_MESSAGE {
        return Err((
            ErrorCode::TooLarge,
            format!(
                "message of {} bytes is over the limit of {MAX_SIGNAL_MESSAGE}",
                text.len()
            ),
        ));
    }
    match parse_signal(text) {
        Some(msg) => Ok(msg),
        None => parse_general(text),
    }
}

/// Any message type: tells a bad shape from an unknown type or version, and
/// names what is wrong.
fn parse_general(text: &str) -> Result<ClientMsg, (ErrorCode, String)> {
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| {
        (
            ErrorCode::BadMessage,
            format!("expected a JSON object with a string \"type\": {e}"),
        )
    })?;
    if !CLIENT_TYPES.contains(&env.ty.as_ref()) {
        let ty: String = env.ty.chars().take(40).collect();
        return Err((
            ErrorCode::UnknownType,
            format!("unknown message type {ty:?}"),
        ));
    }
    if env.v != Some(u64::from(SIGNAL_VERSION)) {
        return Err((
            ErrorCode::BadVersion,
            format!("field \"v\" must be {SIGNAL_VERSION}"),
        ));
    }
    serde_json::from_str(text).map_err(|e| {
        (
            ErrorCode::BadMessage,
            format!("bad {} message: {e}", env.ty),
        )
    })
}

/// A `signal` message as written, every field in one struct. [`ClientMsg`] is
/// tagged by `type` and its `data` by `kind`, and serde reads such enums by
/// buffering the whole object first, then reading it again.
#[derive(Deserialize)]
struct SignalIn<'a> {
    /// Borrowed: a `type` with escapes is left to the general path.
    #[serde(rename = "type")]
    ty: &'a str,
    v: u32,
    to: PeerId,
    data: DataIn,
}

/// [`SignalData`] flattened: `kind` picks the variant, which needs its fields.
#[derive(Deserialize)]
struct DataIn {
    kind: Kind,
    sdp: Option<String>,
    candidate: Option<String>,
    #[serde(rename = "sdpMid")]
    sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex")]
    sdp_mline_index: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Offer,
    Answer,
    Candidate,
}

/// A well-formed `signal` message in one pass; `None` leaves the text to the
/// general path (which may still accept it, e.g. a field of a type the other
/// kinds' fields do not allow, or reject it with its own message).
fn parse_signal(text: &str) -> Option<ClientMsg> {
    let m: SignalIn<'_> = serde_json::from_str(text).ok()?;
    if m.ty != "signal" || m.v != SIGNAL_VERSION {
        return None;
    }
    let d = m.data;
    let data = match d.kind {
        Kind::Offer => SignalData::Offer { sdp: d.sdp? },
        Kind::Answer => SignalData::Answer { sdp: d.sdp? },
        Kind::Candidate => SignalData::Candidate {
            candidate: d.candidate?,
            sdp_mid: d.sdp_mid,
            sdp_mline_index: d.sdp_mline_index,
        },
    };
    Some(ClientMsg::Signal {
        v: m.v,
        to: m.to,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_tells_shapes_types_and_versions_apart() {
        let code = |s: &str| parse(s).map_err(|e| e.0).err();
        assert_eq!(code("not json"), Some(ErrorCode::BadMessage));
        assert_eq!(code(r#"{"v":1}"#), Some(ErrorCode::BadMessage));
        assert_eq!(
            code(r#"{"type":"dance","v":1}"#),
            Some(ErrorCode::UnknownType)
        );
        assert_eq!(
            code(r#"{"type":"heartbeat","v":9}"#),
            Some(ErrorCode::BadVersion)
        );
        assert_eq!(
            code(r#"{"type":"signal","v":2,"to":3,"data":{"kind":"offer","sdp":"x"}}"#),
            Some(ErrorCode::BadVersion)
        );
        assert_eq!(
            code(r#"{"type":"bid","v":1,"bits":"x"}"#),
            Some(ErrorCode::BadMessage)
        );
        assert_eq!(code(r#"{"type":"heartbeat","v":1}"#), None);
        let big = format!(
            r#"{{"type":"heartbeat","v":1,"pad":"{}"}}"#,
            "x".repeat(MAX_SIGNAL_MESSAGE)
        );
        assert_eq!(code(&big), Some(ErrorCode::TooLarge));
        let big_signal = format!(
            r#"{{"type":"signal","v":1,"to":3,"data":{{"kind":"offer","sdp":"{}"}}}}"#,
            "x".repeat(MAX_SIGNAL_MESSAGE)
        );
        assert_eq!(code(&big_signal), Some(ErrorCode::TooLarge));
    }

    #[test]
    fn bad_signals_get_the_general_paths_answer() {
        for text in [
            r#"{"type":"signal","v":1,"to":3,"data":{"kind":"offer"}}"#,
            r#"{"type":"signal","v":1,"to":3,"data":{"kind":"offer","sdp":null}}"#,
            r#"{"type":"signal","v":1,"to":3,"data":{"kind":"dance","sdp":"x"}}"#,
            r#"{"type":"signal","v":1,"to":-3,"data":{"kind":"offer","sdp":"x"}}"#,
            r#"{"type":"signal","v":1,"data":{"kind":"offer","sdp":"x"}}"#,
            r#"{"type":"signal","v":1,"to":3,"data":{"kind":"candidate","sdpMid":"0"}}"#,
            r#"{"type":"signal","v":1,"to":3,"to":4,"data":{"kind":"offer","sdp":"x"}}"#,
            r#"{"type":"signal","v":1,"to":3,"data":{"kind":"offer","sdp":"x"}} trailing"#,
        ] {
            assert!(parse_signal(text).is_none(), "{text}");
            let answer = parse(text);
            assert!(answer.is_err(), "{text}");
            assert_eq!(answer, parse_general(text), "{text}");
        }
    }

    #[test]
    fn odd_but_valid_signals_read_as_the_general_path_reads_them() {
        for text in [
            // Field order, unknown fields, nulls for optional fields, escapes.
            r#"{"data":{"sdp":"v=0\r\n","kind":"answer"},"to":7,"v":1,"type":"signal","x":[1]}"#,
            r#"{"type":"signal","v":1,"to":7,"data":{"kind":"candidate","candidate":"c","sdpMid":null,"sdpMLineIndex":null}}"#,
            r#"{"type":"signal","v":1,"to":7,"data":{"kind":"candidate","candidate":"\u0063","sdp":"ignored"}}"#,
            // Fields of another kind in a type the signal path refuses: still accepted.
            r#"{"type":"signal","v":1,"to":7,"data":{"kind":"offer","sdp":"x","candidate":5}}"#,
            r#"{"type":"\u0073ignal","v":1,"to":7,"data":{"kind":"offer","sdp":"x"}}"#,
        ] {
            let general = parse_general(text).expect(text);
            assert_eq!(parse(text), Ok(general.clone()), "{text}");
            if let Some(fast) = parse_signal(text) {
                assert_eq!(fast, general, "{text}");
            }
        }
    }

    fn any_data() -> impl Strategy<Value = SignalData> {
        prop_oneof![
            any::<String>().prop_map(|sdp| SignalData::Offer { sdp }),
            any::<String>().prop_map(|sdp| SignalData::Answer { sdp }),
            (
                any::<String>(),
                proptest::option::of(any::<String>()),
                proptest::option::of(any::<u16>())
            )
                .prop_map(|(candidate, sdp_mid, sdp_mline_index)| {
                    SignalData::Candidate {
                        candidate,
                        sdp_mid,
                        sdp_mline_index,
                    }
                }),
        ]
    }

    proptest! {
        #[test]
        fn the_signal_path_reads_every_signal_as_the_general_path(
            to in any::<PeerId>(),
            data in any_data(),
        ) {
            let msg = ClientMsg::Signal { v: SIGNAL_VERSION, to, data };
            let text = serde_json::to_string(&msg).expect("serializes");
            prop_assert_eq!(parse_signal(&text), Some(msg.clone()));
            prop_assert_eq!(parse_general(&text).ok(), Some(msg));
        }
    }
}

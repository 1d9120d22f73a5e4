//! The JSON message path: each line of the input is one client message (a
//! text frame if it is UTF-8, else a binary frame), read with
//! `Session::receive_json` and answered with `send_json` or the error's text.
//! Nothing may panic or hang, and every value that parses must survive
//! wshub's JSON round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wshub::{Config, Request, Session};
use wshub_fuzz::{final_frame, converse};

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;

async fn answer_json(io: tokio::io::DuplexStream) {
    let mut session = Session::from_upgraded(io, Request::unknown(), &Config::default()).await;
    loop {
        match session.receive_json::<Value>().await {
            Ok(value) => {
                let msg = wshub::json(&value).expect("a parsed value serializes");
                let again: Value = wshub::from_json(&msg).expect("what wshub wrote parses");
                assert_eq!(again, value, "the JSON round trip changed the value");
                if session.send_json(&value).await.is_err() {
                    break;
                }
            }
            Err(err) if err.is_json() => {
                if session.send(format!("error: {err}")).await.is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Vec::new();
    for line in data.split(|&b| b == b'\n') {
        match std::str::from_utf8(line) {
            Ok(text) => input.extend(final_frame(TEXT, text.as_bytes())),
            Err(_) => input.extend(final_frame(BINARY, line)),
        }
    }
    input.extend(final_frame(CLOSE, &1000u16.to_be_bytes()));
    converse(&input, answer_json);
});

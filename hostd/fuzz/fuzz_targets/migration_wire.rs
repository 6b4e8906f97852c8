//! Bytes a migration source sends: the first frame as the destination reads it before
//! anyone is authenticated (`decode_hello`), then any sequence of frames, and the saved
//! state a State frame carries. Each must decode to a value or an error, never a panic,
//! and a frame that decodes must encode back to exactly the bytes it came from.
#![no_main]

use hostd::migration::{state, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((hello, n))) = wire::decode_hello(data) {
        assert!(n - wire::HEADER_LEN <= wire::MAX_HELLO);
        let mut out = Vec::new();
        wire::encode(&wire::Frame::Hello(hello), &mut out);
        assert_eq!(&out[..], &data[..n]);
    }
    let mut rest = data;
    while let Ok(Some((frame, n))) = wire::decode(rest) {
        assert!(n >= wire::HEADER_LEN && n <= rest.len());
        let mut out = Vec::new();
        wire::encode(&frame, &mut out);
        assert_eq!(&out[..], &rest[..n], "{frame:?}");
        if let wire::Frame::State(s) = &frame {
            let _ = state::decode(s);
        }
        rest = &rest[n..];
    }
    let _ = state::decode(data);
});

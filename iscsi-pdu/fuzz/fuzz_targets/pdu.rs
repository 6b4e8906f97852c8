//! Any bytes off the wire: framing, headers, AHS and text segments must decode to a value
//! or an error, never a panic, and what decodes must encode back to the same header.
#![no_main]

use bytes::BytesMut;
use iscsi_pdu::frame::{self, FrameConfig};
use iscsi_pdu::{Header, text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let cfg = FrameConfig {
        header_digest: mode & 1 != 0,
        data_digest: mode & 2 != 0,
        max_recv_data_segment: if mode & 4 != 0 { 8192 } else { 1 << 20 },
    };
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(pdu)) = frame::decode(&mut buf, &cfg) {
        if let Ok(h) = pdu.header() {
            let again = Header::parse(&h.to_bytes()).expect("an encoded header parses");
            assert_eq!(again, h);
            let mut wire = Vec::new();
            frame::encode(&h, &[], &pdu.data, &cfg, &mut wire).expect("encodes");
            let mut b = BytesMut::from(&wire[..]);
            let back = frame::decode(&mut b, &cfg).expect("re-decodes").expect("complete");
            assert_eq!(back.header().expect("parses"), h);
            assert_eq!(back.data, pdu.data);
        }
        let _ = frame::parse_ahs(pdu.ahs.clone());
        let _ = text::parse(&pdu.data);
    }
});

//! Property tests: every header and frame round-trips, and no input panics the decoder.

use bytes::BytesMut;
use iscsi_pdu::bhs::{self, BHS_LEN, Header};
use iscsi_pdu::frame::{self, FrameConfig};
use iscsi_pdu::{chap, text};
use proptest::prelude::*;

fn any_cfg() -> impl Strategy<Value = FrameConfig> {
    (any::<bool>(), any::<bool>()).prop_map(|(h, d)| FrameConfig {
        header_digest: h,
        data_digest: d,
        max_recv_data_segment: 1 << 20,
    })
}

/// Any parseable BHS: random bytes with a valid opcode.
fn any_header() -> impl Strategy<Value = Header> {
    let ops = prop::sample::select(vec![
        0x00u8, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26,
        0x31, 0x32, 0x3f,
    ]);
    (
        ops,
        prop::array::uniform32(any::<u8>()),
        prop::array::uniform16(any::<u8>()),
    )
        .prop_map(|(op, a, b)| {
            let mut raw = [0u8; BHS_LEN];
            raw[..32].copy_from_slice(&a);
            raw[32..].copy_from_slice(&b);
            raw[0] = (raw[0] & 0x40) | op;
            Header::parse(&raw).expect("valid opcode parses")
        })
}

proptest! {
    #[test]
    fn header_round_trips(h in any_header()) {
        let bytes = h.to_bytes();
        prop_assert_eq!(Header::parse(&bytes).unwrap(), h);
        prop_assert_eq!(bhs::data_segment_len(&bytes), 0);
    }

    #[test]
    fn frame_round_trips(
        h in any_header(),
        data in prop::collection::vec(any::<u8>(), 0..3000),
        ahs_words in 0usize..4,
        cfg in any_cfg(),
    ) {
        let ahs = vec![0u8; ahs_words * 4];
        let mut wire = Vec::new();
        frame::encode(&h, &ahs, &data, &cfg, &mut wire).unwrap();
        prop_assert_eq!(wire.len() % 4, 0);
        // Every strict prefix is "not yet", never an error.
        for cut in [0, 1, 47, 48, wire.len() / 2, wire.len() - 1] {
            let mut part = BytesMut::from(&wire[..cut.min(wire.len() - 1)]);
            prop_assert!(frame::decode(&mut part, &cfg).unwrap().is_none());
        }
        let mut buf = BytesMut::from(&wire[..]);
        buf.extend_from_slice(b"next");
        let pdu = frame::decode(&mut buf, &cfg).unwrap().unwrap();
        prop_assert_eq!(pdu.header().unwrap(), h);
        prop_assert_eq!(&pdu.data[..], &data[..]);
        prop_assert_eq!(pdu.ahs.len(), ahs.len());
        prop_assert_eq!(&buf[..], b"next");
    }

    #[test]
    fn vectored_encoding_matches_encode(
        h in any_header(),
        data in prop::collection::vec(any::<u8>(), 0..600),
        cfg in any_cfg(),
    ) {
        let mut whole = Vec::new();
        frame::encode(&h, &[], &data, &cfg, &mut whole).unwrap();
        let mut parts = frame::encode_header(&h, data.len(), &cfg).as_bytes().to_vec();
        parts.extend_from_slice(&data);
        parts.extend_from_slice(frame::trailer(&data, &cfg).as_bytes());
        prop_assert_eq!(whole, parts);
    }

    #[test]
    fn corrupted_digests_are_errors(
        h in any_header(),
        data in prop::collection::vec(any::<u8>(), 1..300),
        flip in any::<prop::sample::Index>(),
    ) {
        let cfg = FrameConfig { header_digest: true, data_digest: true, max_recv_data_segment: 4096 };
        let mut wire = Vec::new();
        frame::encode(&h, &[], &data, &cfg, &mut wire).unwrap();
        // Flip one bit anywhere but in the length fields (which change the framing).
        let mut i = flip.index(wire.len());
        if (4..8).contains(&i) { i = 8; }
        wire[i] ^= 0x10;
        let mut buf = BytesMut::from(&wire[..]);
        prop_assert!(frame::decode(&mut buf, &cfg).is_err());
    }

    #[test]
    fn random_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        cfg in any_cfg(),
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        // Decode until an error or "not yet"; each step consumes bytes, so this ends.
        while let Ok(Some(pdu)) = frame::decode(&mut buf, &cfg) {
            let _ = pdu.header();
            let _ = frame::parse_ahs(pdu.ahs.clone());
            let _ = text::parse(&pdu.data);
        }
        let _ = text::parse(&bytes);
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = chap::decode_binary(s);
            let _ = text::parse_number(s);
        }
    }

    #[test]
    fn text_round_trips(
        pairs in prop::collection::vec(("[A-Za-z][A-Za-z0-9.+@_-]{0,20}", "[ -~]{0,40}"), 0..10)
    ) {
        let encoded = text::encode(&pairs);
        let parsed = text::parse(&encoded).unwrap();
        let expected: Vec<(String, String)> = pairs;
        prop_assert_eq!(parsed, expected);
    }

    #[test]
    fn binary_values_round_trip(bytes in prop::collection::vec(any::<u8>(), 1..200)) {
        prop_assert_eq!(chap::decode_binary(&chap::encode_hex(&bytes)).unwrap(), bytes);
    }

    #[test]
    fn lun_field_round_trips(lun in 0u16..16384) {
        prop_assert_eq!(bhs::decode_lun(bhs::encode_lun(lun)), Some(lun));
    }
}

#[test]
fn oversized_segment_is_refused_before_it_arrives() {
    let cfg = FrameConfig::default();
    let mut bhs = [0u8; BHS_LEN];
    bhs[0] = 0x01;
    bhs::set_lengths(&mut bhs, 0, 8193);
    let mut buf = BytesMut::from(&bhs[..]);
    assert!(matches!(
        frame::decode(&mut buf, &cfg),
        Err(iscsi_pdu::PduError::DataSegmentTooLong {
            len: 8193,
            max: 8192
        })
    ));
}

#[test]
fn extended_cdb_ahs_parses() {
    // AHSLength 17 (reserved byte + 16 extra CDB bytes), type 1, padded to 20 bytes.
    let mut area = vec![0u8, 17, 1, 0];
    area.extend(1..=16u8);
    let ahs = frame::parse_ahs(area.into()).unwrap();
    assert_eq!(ahs.len(), 1);
    assert_eq!(ahs[0].kind, frame::ahs_type::EXTENDED_CDB);
    assert_eq!(&ahs[0].data[..], &(1..=16u8).collect::<Vec<_>>()[..]);
    assert!(frame::parse_ahs(vec![0u8, 40, 1, 0].into()).is_err());
    assert!(frame::parse_ahs(vec![0u8, 0, 1, 0].into()).is_err());
}

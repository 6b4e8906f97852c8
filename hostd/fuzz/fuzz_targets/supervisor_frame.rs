//! The control channel between `hostd` and a VM process (a VM process is where guest
//! input is parsed, so the daemon must not trust what comes back): any bytes must frame
//! into messages or an error, never a panic, and every message that decodes must encode
//! to bytes that decode to the same encoding.
#![no_main]

use hostd::supervisor::frame;
use hostd::supervisor::protocol::{Command, Event, VmRecord};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn frames<M: Message + Default>(data: &[u8]) {
    let mut buf = data.to_vec();
    while let Ok(Some(m)) = frame::decode::<M>(&mut buf) {
        // Byte equality rather than value equality: a double may be NaN.
        let wire = frame::encode(&m);
        let mut again = wire.clone();
        let back = frame::decode::<M>(&mut again)
            .expect("an encoded message decodes")
            .expect("and is whole");
        assert!(again.is_empty());
        assert_eq!(frame::encode(&back), wire);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => frames::<Command>(rest),
        1 => frames::<Event>(rest),
        _ => frames::<VmRecord>(rest),
    }
});

//! The dirty-map file decoder (`volume::dirty_map::decode`) on arbitrary
//! bytes: it must never panic, and whatever it accepts must re-encode to
//! a file that decodes to the same set.
//!
//! Input: the first byte picks the extent size (512 << (b % 12)); the rest
//! is the file.

#![no_main]

use blockd::volume::dirty_map::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, file)) = data.split_first() else {
        return;
    };
    let extent_size = 512u64 << (first % 12);
    if let Ok((set, flags)) = decode(file, extent_size) {
        let again = encode(&set, extent_size, flags & 1 != 0);
        let (back, _) = decode(&again, extent_size).expect("re-encoded map must decode");
        assert_eq!(back, set);
    }
});

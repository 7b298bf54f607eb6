//! Arbitrary bytes as a .npz archive and as a .npy array: errors are fine, panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(arrays) = nibble_driver::calibrate::npy::parse_npz("fuzz.npz", data) {
        for (_, a) in arrays {
            let _ = (a.to_f64(), a.as_f32(), a.as_i64());
        }
    }
    if let Ok(a) = nibble_driver::calibrate::npy::parse_npy("fuzz.npy", data) {
        let _ = (a.to_f64(), a.as_f32(), a.as_u16());
    }
});

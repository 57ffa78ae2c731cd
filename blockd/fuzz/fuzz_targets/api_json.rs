//! Fuzzes the control API's request bodies: every JSON body the daemon
//! decodes, then the checks each one goes through before it is acted on.
//!
//! Input layout: byte 0 chooses the request type, the rest is the body.
#![no_main]

use blockd_api::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data));

fn run(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match sel % 9 {
        0 => {
            if let Ok(r) = serde_json::from_slice::<CreateVolume>(body) {
                let _ = validate_name(&r.name);
                let _ = parse_size(&r.size.to_string());
            }
        }
        1 => {
            let _ = serde_json::from_slice::<CreateSnapshot>(body);
        }
        2 => {
            let _ = serde_json::from_slice::<ResizeVolume>(body);
        }
        3 => {
            if let Ok(r) = serde_json::from_slice::<CreateLocation>(body) {
                // Secrets never show in Debug output.
                for s in [
                    &r.s3_secret_key,
                    &r.azure_account_key,
                    &r.encryption_passphrase,
                ]
                .into_iter()
                .flatten()
                {
                    assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
                }
            }
        }
        4 => {
            if let Ok(r) = serde_json::from_slice::<GcRequest>(body) {
                if let Some(m) = r.max_unused {
                    let _ = m.limit(u64::MAX);
                    let back: MaxUnused = m.to_string().parse().expect("Display parses back");
                    assert_eq!(back, m);
                }
            }
        }
        5 => {
            let _ = serde_json::from_slice::<CreateSchedule>(body);
        }
        6 => {
            let _ = serde_json::from_slice::<MountRequest>(body);
        }
        7 => {
            if let Ok(s) = std::str::from_utf8(body) {
                let _ = parse_size(s);
                let _ = validate_name(s);
                let _ = s.parse::<MaxUnused>();
            }
        }
        _ => {
            let _ = serde_json::from_slice::<serde_json::Value>(body);
        }
    }
}

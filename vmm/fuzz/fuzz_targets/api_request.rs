//! The API's request parser and router on arbitrary bytes: whatever arrives on the socket,
//! parsing and handling return a response or ask for more; nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_vmm::api::http;
use shoal_vmm::api::routes::{ApiState, InstanceState, Outcome};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // Several requests on one connection, against each instance state.
    let mut states = [
        ApiState::default(),
        ApiState { state: InstanceState::Running, ..ApiState::default() },
        ApiState { state: InstanceState::Paused, ..ApiState::default() },
    ];
    for _ in 0..4 {
        match http::parse(rest) {
            Ok(Some((req, used))) => {
                for state in states.iter_mut() {
                    if let Outcome::Reply(r) = state.handle(&req) {
                        let _ = r.to_bytes();
                    }
                }
                if used == 0 || used > rest.len() {
                    panic!("parser consumed {used} of {} bytes", rest.len());
                }
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(e) => {
                let _ = e.status();
                break;
            }
        }
    }
});

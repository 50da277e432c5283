//! Fuzzes `stalltrace::capture::read_capture`. The first input byte picks the mode. An
//! even byte makes the rest of the input the whole file. An odd byte appends the rest to
//! a valid header of this build, so the fuzzer reaches the frame parser without having
//! to guess the header's JSON and record sizes. The reader must not panic, and a stop it
//! reports must lie inside the file.
#![no_main]

use std::{path::PathBuf, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use stalltrace::capture::{read_capture, CaptureHeader, CaptureWriter, HostInfo};

/// File that each input is written to, one per fuzzing process.
fn input_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("stalltrace-fuzz-{}.capture", std::process::id())))
}

/// The magic, version and header of a capture written by this build, with no frames.
fn valid_header() -> &'static [u8] {
    static HEADER: OnceLock<Vec<u8>> = OnceLock::new();
    HEADER.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("stalltrace-fuzz-header-{}.capture", std::process::id()));
        let header = CaptureHeader::new(1_400_000, "6.18.0".to_owned(), Vec::new(), HostInfo::default());
        let mut writer = CaptureWriter::create(&path, &header).expect("failed to write the header");
        writer.flush().expect("failed to write the header");
        drop(writer);
        let bytes = std::fs::read(&path).expect("failed to read the header back");
        let _ = std::fs::remove_file(&path);
        bytes
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut bytes = valid_header().to_vec();
        bytes.extend_from_slice(rest);
        bytes
    };
    let path = input_path();
    std::fs::write(path, &bytes).expect("failed to write the input file");
    if let Ok(capture) = read_capture(path) {
        if let Some(stop) = capture.stopped {
            assert!((stop.offset as usize) < bytes.len(), "stop at {} past the end of {} bytes", stop.offset, bytes.len());
        }
    }
});

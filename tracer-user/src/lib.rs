//! stalltrace: finds event-loop threads whose loop stopped turning, and reports why.
//!
//! The path of one stall: the BPF programs in `tracer-ebpf` account a loop
//! thread's time and send a [`tracer_common::StallRecord`] when an iteration
//! ends past the threshold. [`live`] reads it from the ring buffer (or
//! [`capture`] from a file) and feeds the [`aggregator`]; [`report`] turns the
//! aggregator's stalls into lines and `report.json`.

pub mod aggregator;
pub mod capture;
pub mod compare;
pub mod diagnosis;
pub mod duration;
pub mod flame;
pub mod kernel;
pub mod live;
pub mod locks;
pub mod probe;
pub mod report;
pub mod stacks;

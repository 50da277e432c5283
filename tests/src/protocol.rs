//! Lines that `loop-workload` prints on stdout, one JSON object per line.

use serde::{Deserialize, Serialize};

/// First line, printed once the loop thread is about to enter its first `epoll_wait`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub pid: u32,
    /// Thread id of the loop thread, which is the main thread.
    pub loop_tid: u32,
}

/// Line printed after each command, with the handler's start and end as
/// CLOCK_MONOTONIC nanoseconds, the clock that stalltrace reports in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The command line as received, without surrounding whitespace.
    pub done: String,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Done {
    pub fn handler_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

/// Line printed instead of `Done` when a command is invalid or its handler failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub error: String,
}

/// Any line of the workload's stdout.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Message {
    Started(Started),
    Done(Done),
    Failed(Failed),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_parses_each_kind() {
        let started: Message = serde_json::from_str(r#"{"pid":10,"loop_tid":10}"#).unwrap();
        assert_eq!(
            started,
            Message::Started(Started {
                pid: 10,
                loop_tid: 10
            })
        );

        let done: Message =
            serde_json::from_str(r#"{"done":"spin 200","start_ns":5,"end_ns":9}"#).unwrap();
        assert_eq!(
            done,
            Message::Done(Done {
                done: "spin 200".into(),
                start_ns: 5,
                end_ns: 9
            })
        );

        let failed: Message = serde_json::from_str(r#"{"error":"unknown command"}"#).unwrap();
        assert_eq!(
            failed,
            Message::Failed(Failed {
                error: "unknown command".into()
            })
        );
    }

    #[test]
    fn message_rejects_unknown_shape() {
        assert!(serde_json::from_str::<Message>(r#"{"pid":10}"#).is_err());
    }
}

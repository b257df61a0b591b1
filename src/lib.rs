//! The few pure pieces of ktproxy that more than one of its programs needs:
//! the `ktproxy` binary (src/main.rs), its test helpers `testclient` and
//! `testserver` (src/bin/), and the end-to-end tests (tests/).
//!
//! This is not the program: the proxy itself lives in the binary's modules.
//! Only what would otherwise be copied belongs here.
//! - [`error`]: the project's error type and its one-line error texts;
//! - [`mountinfo`]: where the cgroup v2 hierarchy is mounted;
//! - [`logline`]: the log lines that tests, scripts and users read (an
//!   interface), each with its parser.

pub mod error;
pub mod logline;
pub mod mountinfo;

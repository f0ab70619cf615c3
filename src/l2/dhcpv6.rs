//! Placeholder: being written.

use super::Verdict;
use crate::conf::NetConfig;

pub fn handle(_cfg: &NetConfig, _frame: &[u8], _out: &mut [u8]) -> Verdict {
    Verdict::Ignored
}

//! `--segment-mb auto`: whether a calibration runs the whole graph in one session (today's path)
//! or by segments ([`crate::calibrate::segmented`]), from the model's size and the memory the
//! machine has available.
//!
//! The rule comes from the peaks measured in issue 19 and BENCHMARKS.md ("Memory against depth"):
//! calibrating the whole graph holds about [`WHOLE_GRAPH_FACTOR`] times the model (GPTQ, the largest:
//! 8.3 GB peak RSS for a 1.95 GB fp16 decoder, 6.1 GB of it anonymous; awq_clip 6.4 GB). The whole
//! graph is kept while that estimate fits in half of the available memory (the other half left to
//! the page cache of the mapped model and to other processes); above it, segments of 1/32 of the
//! available memory (at least 1 MiB) of weights, whose own peak at the same factor is an eighth of it:
//! on a machine with 20 GB available, segments of 640 MB, about one and a half decoder layers of a
//! 7B fp16 model (405 MB of weights a layer), one layer of larger ones.

/// Whole-graph calibration's peak memory per byte of model weights (see the module docs).
pub const WHOLE_GRAPH_FACTOR: u64 = 4;

/// The segment size (bytes of weights) `--segment-mb auto` chooses for a model of `model_bytes`
/// bytes on a machine with `available` bytes of memory available (`None`: unknown); `None` when the
/// whole graph is calibrated in one session: when `WHOLE_GRAPH_FACTOR * model_bytes` is at most half
/// of `available`, or `available` is unknown.
pub fn auto_segment_bytes(model_bytes: u64, available: Option<u64>) -> Option<u64> {
    let available = available?;
    if WHOLE_GRAPH_FACTOR.saturating_mul(model_bytes) <= available / 2 {
        return None;
    }
    Some((available / 32).max(1 << 20))
}

/// The memory available to a new process, in bytes: `MemAvailable` of `/proc/meminfo` (Linux);
/// `None` when it cannot be read.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    mem_available(&info)
}

/// `MemAvailable` (kB) of a `/proc/meminfo` text, in bytes.
fn mem_available(info: &str) -> Option<u64> {
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    #[test]
    fn small_models_stay_whole_and_large_ones_are_cut() {
        // 20 GB available: whole up to 2.5 GB of weights (4x within half the memory).
        let a = Some(20 * GB);
        assert_eq!(auto_segment_bytes(0, a), None);
        assert_eq!(auto_segment_bytes(GB / 2, a), None);
        assert_eq!(auto_segment_bytes(20 * GB / 8, a), None);
        assert_eq!(auto_segment_bytes(20 * GB / 8 + 1, a), Some(20 * GB / 32));
        // A 7B fp16 model (13.5 GB): segments of 640 MB.
        assert_eq!(auto_segment_bytes(13_500_000_000, a), Some(640 << 20));
        // A small machine cuts a smaller model, in segments of at least 1 MiB.
        assert_eq!(auto_segment_bytes(GB, Some(4 * GB)), Some(128 << 20));
        assert_eq!(auto_segment_bytes(GB, Some(8 << 20)), Some(1 << 20));
        // Unknown memory: today's whole-graph path; no overflow on absurd sizes.
        assert_eq!(auto_segment_bytes(100 * GB, None), None);
        assert_eq!(auto_segment_bytes(u64::MAX, a), Some(20 * GB / 32));
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let info = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(info), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert!(available_memory().is_some_and(|b| b > 0), "this machine has a /proc/meminfo");
    }
}

//! The driver's errors: one variant per failure, each naming the file, node or tensor and the fix.
//! A cause that a message already includes is not also its `source()`, so that printing the error
//! chain (`{:#}`) says it once.

use std::path::PathBuf;

/// Everything that can go wrong between reading a model and writing its quantized form.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file could not be read.
    #[error("cannot read {}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause (in the message, so not a `source`: it would be printed twice).
        cause: std::io::Error,
    },
    /// The bytes are not an ONNX model.
    #[error("{} is not a valid ONNX model ({why}); check that it is a complete .onnx file", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The decoder's complaint.
        why: String,
    },
    /// A tensor's external data is missing, unsafe or inconsistent.
    #[error("tensor '{tensor}': external data {why}")]
    ExternalData {
        /// The tensor.
        tensor: String,
        /// What is wrong, with the fix.
        why: String,
    },
    /// A tensor's contents do not match its declaration.
    #[error("tensor '{tensor}': {why}")]
    BadTensor {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        why: String,
    },
    /// A weight of a type that cannot be quantized.
    #[error("weight '{tensor}' of node '{node}' has data type {dtype}; only float32, float16 and bfloat16 weights can be quantized (exclude the node with --exclude '{node}')")]
    UnsupportedDtype {
        /// The weight.
        tensor: String,
        /// Its consumer.
        node: String,
        /// ONNX's name of the type.
        dtype: String,
    },
    /// NaN or infinity in a weight.
    #[error("weight '{tensor}' holds NaN or Inf in block {block} (rows {start}..{end} along the quantized axis, column {column}); fix the weight, or leave the node unquantized with --exclude")]
    NonFinite {
        /// The weight.
        tensor: String,
        /// Block index.
        block: usize,
        /// Column index.
        column: usize,
        /// First element of the block.
        start: usize,
        /// One past its last.
        end: usize,
    },
    /// A kernel refused its input.
    #[error("weight '{tensor}': {cause}")]
    Kernel {
        /// The weight.
        tensor: String,
        /// The kernel's error (in the message, so not a `source`).
        cause: nibble::Error,
    },
    /// An invalid option value.
    #[error("{0}")]
    Usage(String),
    /// An operator that changed incompatibly before opset 21 and cannot be converted.
    #[error("node '{node}' ({op} at opset {version}) cannot be upgraded to opset 21, which INT4 DequantizeLinear needs: {why}")]
    OpsetUpgrade {
        /// The node.
        node: String,
        /// Its operator.
        op: String,
        /// The model's opset.
        version: i64,
        /// Why it cannot be converted.
        why: String,
    },
    /// The model's opset is too old to upgrade.
    #[error("the model uses default-domain opset {version}; nibble upgrades opsets 13 and later to 21 (re-export the model with opset >= 13)")]
    OpsetTooOld {
        /// The model's opset.
        version: i64,
    },
    /// The output path is unusable.
    #[error("output {}: {why}", path.display())]
    Output {
        /// The path.
        path: PathBuf,
        /// What is wrong, with the fix.
        why: String,
    },
    /// Writing the output failed.
    #[error("cannot write {}: {cause}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause (in the message, so not a `source`).
        cause: std::io::Error,
    },
    /// A model folder (onnxruntime-genai or Optimum) that cannot be quantized as it is.
    #[error("folder {}: {why}", path.display())]
    Folder {
        /// The folder (or the file in it that is wrong).
        path: PathBuf,
        /// What is wrong, with the fix.
        why: String,
    },
    /// A shard (`--segments`, `nibble merge`) that cannot be read or merged.
    #[error("shard {}: {why}", path.display())]
    Shard {
        /// The shard folder.
        path: PathBuf,
        /// What is wrong, with the fix.
        why: String,
    },
    /// ONNX Runtime could not be found, loaded or run.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
}

impl Error {
    /// Names the segment a session error came from: `segment S of N (from node 'FIRST'): CAUSE`
    /// (`what` before it, e.g. `"calibration "`), ONNX Runtime's cause said once. A graph run
    /// whole (`count` 1) keeps the error as it is: there is no segment to name.
    pub fn in_segment(self, what: &str, segment: usize, count: usize, first: &str) -> Error {
        if count <= 1 {
            return self;
        }
        let cause = match self {
            Error::Runtime(m) => m,
            other => other.to_string(),
        };
        Error::Runtime(format!("{what}segment {} of {count} (from node '{first}'): {cause}", segment + 1))
    }

    /// Wraps a kernel error for `tensor`, turning its NaN report into [`Error::NonFinite`].
    pub fn kernel(tensor: &str, source: nibble::Error) -> Error {
        match source {
            nibble::Error::NonFinite { block, column, start, end } => {
                Error::NonFinite { tensor: tensor.to_string(), block, column, start, end }
            }
            cause => Error::Kernel { tensor: tensor.to_string(), cause },
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! panguc-ir: the tensor IR shared by every stage of panguc.
//!
//! Owns element types, symbolic shapes, the graph IR (modules of functions of
//! SSA values), its verifier, the canonical text format (printer and parser),
//! the model configuration, and the reference interpreter that defines what
//! every op means. It knows nothing about egg, LLVM, AscendC or files on disk.

pub mod batch;
pub mod config;
pub mod dtype;
pub mod graph;
pub mod infer;
pub mod interp;
pub mod kernel;
pub mod kernels;
pub mod multirank;
pub mod op;
pub mod session;
pub mod shape;
pub mod tensor;
pub mod text;
pub mod verify;

pub use config::PanguConfig;
pub use dtype::DType;
pub use graph::{Function, Module, Node, Param, ParamKind, Value, ValueId};
pub use op::Op;
pub use shape::{Bindings, Dim, TensorType};
pub use tensor::{Tensor, TensorData};

/// Supplies checkpoint tensors to the reference interpreter, converted to f32.
///
/// Implemented by the compiler's checkpoint loader (memory-mapped safetensors)
/// and by the runtime's package loader; tests implement it over in-memory maps.
pub trait WeightSource {
    /// Load tensor `name` as f32. `shape` is the shape the IR expects; an
    /// implementation must fail with a message naming the tensor (and file)
    /// when the stored tensor is missing or has a different shape.
    fn load_f32(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor>;

    /// Load integer tensor `name` (int8 weights, int32 `quant_bias`, int64
    /// `deq_scale` words) exactly, as i64 values. Sources that hold no
    /// integer tensors keep this default, which names the tensor.
    fn load_i64(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
        let _ = shape;
        anyhow::bail!("weight `{name}` is an integer tensor, which this weight source cannot load")
    }
}

impl WeightSource for std::collections::HashMap<String, Tensor> {
    fn load_f32(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
        let t = self.get(name).ok_or_else(|| anyhow::anyhow!("weight `{name}` is missing"))?;
        anyhow::ensure!(t.shape == shape, "weight `{name}` has shape {:?}, expected {shape:?}", t.shape);
        Ok(t.clone())
    }

    fn load_i64(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
        self.load_f32(name, shape)
    }
}

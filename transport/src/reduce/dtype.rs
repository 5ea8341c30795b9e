//! The element types collectives move and reduce, and the reductions they apply.

/// The reduction a collective applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum, then divide by the world size (integers: truncating division).
    Avg,
    Max,
    Min,
}

/// Element types collectives can reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    I64,
    /// bfloat16 ([`Bf16`](super::Bf16)): reduced in f32, rounded back to 16 bits after every step.
    BF16,
    /// IEEE binary16 ([`F16`](super::F16)): reduced in f32, rounded back to 16 bits after every step.
    F16,
    /// Raw bytes: may be moved, not reduced.
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }
}

/// A `Pod` type with a [`DType`] tag.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: DType;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}

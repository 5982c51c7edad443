//! The `.cu` sources embedded in the binary, and the kernels each defines.

/// One embedded `.cu` source and the kernels it defines.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// File name in `lora-kernels/cuda/`.
    pub file: &'static str,
    /// The source text (without the shared prelude).
    pub code: &'static str,
    /// The `extern "C" __global__` entry points it defines.
    pub kernels: &'static [&'static str],
}

/// Prepended to every source: the dropout hash shared with [`crate::rng`].
pub const PRELUDE: &str = include_str!("../../cuda/prelude.cuh");

/// Every kernel source.
pub const SOURCES: &[Source] = &[
    Source {
        file: "boxes.cu",
        code: include_str!("../../cuda/boxes.cu"),
        kernels: &["box_losses_forward", "box_losses_backward"],
    },
    Source {
        file: "pool.cu",
        code: include_str!("../../cuda/pool.cu"),
        kernels: &[
            "max_pool2d_forward",
            "max_pool2d_backward",
            "adaptive_avg_pool2d_forward",
            "adaptive_avg_pool2d_backward",
            "upsample_nearest_forward",
            "upsample_nearest_backward",
        ],
    },
    Source {
        file: "conv.cu",
        code: include_str!("../../cuda/conv.cu"),
        kernels: &["conv_im2col", "conv_col2im"],
    },
    Source {
        file: "lora.cu",
        code: include_str!("../../cuda/lora.cu"),
        kernels: &[
            "lora_shrink",
            "lora_expand",
            "lora_backward_g_db",
            "lora_reduce_partials",
            "lora_backward_da",
            "lora_backward_dx",
        ],
    },
    Source {
        file: "elementwise.cu",
        code: include_str!("../../cuda/elementwise.cu"),
        kernels: &[
            "add_forward",
            "accumulate",
            "scale_in_place",
            "bias_add",
            "gelu_forward",
            "gelu_backward",
            "silu_forward",
            "silu_backward",
            "gelu_erf_forward",
            "gelu_erf_backward",
            "quick_gelu_forward",
            "quick_gelu_backward",
            "relu_forward",
            "relu_backward",
            "sigmoid_forward",
            "sigmoid_backward",
            "swiglu_forward",
            "swiglu_backward",
            "geglu_forward",
            "geglu_backward",
            "add_planes_forward",
            "add_planes_backward_bias",
            "widen_bf16",
            "widen_f16",
            "narrow_forward",
            "narrow_backward",
            "transpose_last2",
        ],
    },
    Source {
        file: "rows.cu",
        code: include_str!("../../cuda/rows.cu"),
        kernels: &[
            "layernorm_forward",
            "layernorm_backward",
            "layernorm_backward_params",
            "groupnorm_forward",
            "groupnorm_backward",
            "groupnorm_backward_params",
            "rmsnorm_forward",
            "rmsnorm_backward",
            "rmsnorm_backward_params",
            "embedding_forward",
            "embedding_backward",
            "rope_forward",
            "rope_backward",
            "batchnorm_forward",
            "batchnorm_backward_dx",
            "batchnorm_backward_params",
            "cross_entropy_forward",
            "cross_entropy_backward",
            "sum_squares_many",
        ],
    },
    Source {
        file: "attention.cu",
        code: include_str!("../../cuda/attention.cu"),
        kernels: &[
            "attention_forward",
            "attention_backward_delta",
            "attention_backward_dq",
            "attention_backward_dkv",
        ],
    },
    Source {
        file: "adamw.cu",
        code: include_str!("../../cuda/adamw.cu"),
        kernels: &["adamw_step"],
    },
];

impl Source {
    /// The text NVRTC compiles: prelude + source.
    pub fn full_text(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}\"\n{}", self.file, self.code)
    }
}

//! `nibble example --kind genai|optimum DIR`: a small synthetic decoder LLM folder as users get it,
//! with seeded random weights and a KV cache.
//!
//! - `genai`: onnxruntime-genai's model builder layout: `model.onnx` + `model.onnx.data`, inputs
//!   `input_ids [batch_size, sequence_length]`, `attention_mask [batch_size, total_sequence_length]`,
//!   `past_key_values.N.key/value [batch_size, kv_heads, past_sequence_length, head_size]` (a *named*
//!   head-size dim), outputs `logits`, `present.N.key/value`; `com.microsoft` GroupQueryAttention with
//!   `seqlens_k` / `total_sequence_length` computed in the graph from the mask, packed QKV MatMul,
//!   `kv_num_heads < num_heads`, rotary in the op; (Skip)SimplifiedLayerNormalization; a tied embedding
//!   read as `Gather(Transpose(lm_head weight))`; `genai_config.json`, a byte-level BPE `tokenizer.json`
//!   and `tokenizer_config.json`.
//! - `optimum`: an Optimum-style export: `model.onnx` with plain MatMul/Softmax attention, inputs
//!   `input_ids`, `attention_mask [batch_size, past_sequence_length + sequence_length]`, `position_ids`,
//!   `past_key_values.N.key/value [batch_size, heads, past_sequence_length, head_size]` (fixed heads and
//!   head size), outputs `logits`, `present.N.key/value`; `config.json` and the same tokenizer files.
//! - `optimum-merged`: Optimum's merged decoder `decoder_model_merged.onnx`: the `optimum` inputs
//!   plus `use_cache_branch [1]` (bool) read by one top-level `If`, whose `then_branch` is the
//!   decoder with past (the cache concatenated) and `else_branch` the decoder without past (the
//!   cache inputs unread); both branches read the same weights, main-graph initializers.

use crate::graph::build::{attr_f, attr_i, attr_ints, init, init_i64, io_named, model, node, Dim};
use crate::graph::onnx::{tensor_proto::DataType, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};
use crate::rng::Rng;
use nibble::FloatFormat;
use std::path::Path;

/// Which folder layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecoderKind {
    /// onnxruntime-genai model builder folder.
    Genai,
    /// Optimum export folder.
    Optimum,
    /// Optimum merged decoder (`decoder_model_merged.onnx`, an `If` on `use_cache_branch`).
    OptimumMerged,
}

/// Shape of the synthetic decoder.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    /// Hidden size.
    pub hidden: usize,
    /// Attention (query) heads.
    pub heads: usize,
    /// Key/value heads (genai kind; the optimum kind uses `heads`).
    pub kv_heads: usize,
    /// MLP size.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Longest sequence (rotary / position tables).
    pub context: usize,
    /// Weight seed.
    pub seed: u64,
    /// GroupQueryAttention's `local_window_size` (genai kind; -1: none; > 0: a sliding window with
    /// a window-sized cache, `sliding_window_cache` = 1, as the builder writes Gemma 3's local
    /// layers; also written to `genai_config.json`'s `sliding_window`).
    pub local_window: i64,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            hidden: 128,
            heads: 4,
            kv_heads: 2,
            intermediate: 352,
            layers: 2,
            context: 512,
            seed: 1,
            local_window: -1,
        }
    }
}

const WORDS: &str = "the of and to in a is that for it as was with be by on not he this are or his from at which \
but have an they you were her she there been one all we their has would when if so no will more out up into do \
any your what some can only other new time could them these two may first then such like our over man me even \
most made after also did many before must through back years where much way well down should because each just \
those people how too little state good very make world still own see men work long get here between both life \
being under never day same another know while last might us great old year off come since against go came right \
used take three small large house place number part water word light night city music story river mountain \
garden window table letter family friend morning evening summer winter spring autumn ocean forest village market \
teacher student school book paper answer question reason system problem power money health model weight value \
token layer block scale matrix vector runtime memory engine signal energy height length color voice field point \
open close begin end walk run read write speak listen learn think feel hold bring carry build grow keep leave \
find give tell ask call move play live believe happen follow stand change lead understand watch allow add spend \
red green blue black white bright dark quiet loud quick slow warm cold early late happy simple strong clear";

/// A byte-level BPE tokenizer (GPT-2 style) over [`WORDS`]: every byte is a token, and each word
/// after a space (`Ġword`) is one token reached by merges from its first letter. Returns
/// (`tokenizer.json` text, vocabulary size).
pub fn tokenizer_json() -> (String, usize) {
    // GPT-2's byte-to-unicode table: printable bytes map to themselves, the others to 256 + n.
    let mut chars = Vec::with_capacity(256);
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        chars.push(if printable {
            char::from_u32(b).expect("byte")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("char")
        });
    }
    let space = chars[b' ' as usize];
    let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut known: std::collections::HashSet<String> = vocab.iter().cloned().collect();
    for word in WORDS.split_whitespace() {
        let mut prefix = space.to_string();
        for c in word.chars() {
            let next = format!("{prefix}{c}");
            if known.insert(next.clone()) {
                merges.push((prefix.clone(), c.to_string()));
                vocab.push(next.clone());
            }
            prefix = next;
        }
    }
    let eos = vocab.len();
    vocab.push("<|endoftext|>".into());
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let vocab_json: Vec<String> = vocab.iter().enumerate().map(|(i, t)| format!("{}: {i}", q(t))).collect();
    let merges_json: Vec<String> = merges.iter().map(|(a, b)| q(&format!("{a} {b}"))).collect();
    let text = format!(
        r#"{{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [{{"id": {eos}, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}],
  "normalizer": null,
  "pre_tokenizer": {{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}},
  "post_processor": {{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}},
  "decoder": {{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}},
  "model": {{"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "vocab": {{{}}}, "merges": [{}]}}
}}
"#,
        vocab_json.join(", "),
        merges_json.join(", ")
    );
    (text, vocab.len())
}

const TOKENIZER_CONFIG: &str = r#"{
  "add_bos_token": false,
  "add_prefix_space": false,
  "bos_token": "<|endoftext|>",
  "eos_token": "<|endoftext|>",
  "unk_token": "<|endoftext|>",
  "model_max_length": 512,
  "tokenizer_class": "GPT2Tokenizer"
}
"#;

/// Writes the folder `dir` (created; its files must not exist unless `force`). Returns the files
/// written and the MatMul weight parameter count.
pub fn write_folder(dir: &Path, kind: DecoderKind, cfg: &DecoderConfig, force: bool) -> anyhow::Result<Vec<String>> {
    let (tokenizer, vocab) = tokenizer_json();
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("tokenizer.json", tokenizer.into_bytes()),
        ("tokenizer_config.json", TOKENIZER_CONFIG.as_bytes().to_vec()),
    ];
    let proto = match kind {
        DecoderKind::Genai => {
            files.push(("genai_config.json", genai_config(cfg, vocab).into_bytes()));
            genai_model(cfg, vocab)
        }
        DecoderKind::Optimum => {
            files.push(("config.json", optimum_config(cfg, vocab).into_bytes()));
            optimum_model(cfg, vocab)
        }
        DecoderKind::OptimumMerged => {
            files.push(("config.json", optimum_config(cfg, vocab).into_bytes()));
            optimum_merged_model(cfg, vocab)
        }
    };
    let data_name = "model.onnx.data";
    let model_name = if kind == DecoderKind::OptimumMerged { "decoder_model_merged.onnx" } else { "model.onnx" };
    let mut names = vec![model_name];
    if kind == DecoderKind::Genai {
        names.push(data_name);
    }
    names.extend(files.iter().map(|(n, _)| *n));
    if !force {
        if let Some(n) = names.iter().find(|n| dir.join(n).exists()) {
            anyhow::bail!("output {}: already exists; pass --force to overwrite it", dir.join(n).display());
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create folder {}: {e}", dir.display()))?;
    let model_bytes = match kind {
        DecoderKind::Genai => {
            let (proto, data) = externalize(proto, data_name);
            std::fs::write(dir.join(data_name), data)?;
            prost::Message::encode_to_vec(&proto)
        }
        DecoderKind::Optimum | DecoderKind::OptimumMerged => prost::Message::encode_to_vec(&proto),
    };
    std::fs::write(dir.join(model_name), model_bytes)?;
    for (name, bytes) in &files {
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(names.iter().map(|s| s.to_string()).collect())
}

/// Moves every initializer of 1 KiB or more to `location` (ONNX external data, 64-byte aligned),
/// as the builder stores its weights in `model.onnx.data`.
fn externalize(mut proto: ModelProto, location: &str) -> (ModelProto, Vec<u8>) {
    use crate::graph::onnx::{tensor_proto::DataLocation, StringStringEntryProto};
    let mut data = Vec::new();
    for t in proto.graph.as_mut().expect("graph").initializer.iter_mut() {
        let Some(raw) = t.raw_data.take_if(|r| r.len() >= 1024) else { continue };
        data.resize(data.len().next_multiple_of(64), 0);
        let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        t.external_data = vec![
            entry("location", location.into()),
            entry("offset", data.len().to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
        data.extend_from_slice(&raw);
    }
    (proto, data)
}

fn genai_config(cfg: &DecoderConfig, vocab: usize) -> String {
    let head = cfg.hidden / cfg.heads;
    let eos = vocab - 1;
    format!(
        r#"{{
    "model": {{
        "bos_token_id": {eos},
        "context_length": {ctx},
        "decoder": {{
            "session_options": {{
                "log_id": "onnxruntime-genai",
                "provider_options": []
            }},
            "filename": "model.onnx",
            "head_size": {head},
            "hidden_size": {hidden},
            "inputs": {{
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value"
            }},
            "outputs": {{
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value"
            }},
            "num_attention_heads": {heads},
            "num_hidden_layers": {layers},
            "num_key_value_heads": {kv}{window}
        }},
        "eos_token_id": {eos},
        "pad_token_id": {eos},
        "type": "llama",
        "vocab_size": {vocab}
    }},
    "search": {{
        "diversity_penalty": 0.0,
        "do_sample": false,
        "early_stopping": true,
        "length_penalty": 1.0,
        "max_length": {ctx},
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": false,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0
    }}
}}
"#,
        ctx = cfg.context,
        hidden = cfg.hidden,
        heads = cfg.heads,
        layers = cfg.layers,
        kv = cfg.kv_heads,
        window = if cfg.local_window > 0 {
            format!(
                ",\n            \"sliding_window\": {{\n                \"window_size\": {},\n                \"pad_value\": 0,\n                \"alignment\": \"left\",\n                \"slide_key_value_cache\": false\n            }}",
                cfg.local_window
            )
        } else {
            String::new()
        },
    )
}

fn optimum_config(cfg: &DecoderConfig, vocab: usize) -> String {
    format!(
        r#"{{
  "architectures": ["GPT2LMHeadModel"],
  "model_type": "gpt2",
  "n_embd": {},
  "n_head": {},
  "n_layer": {},
  "n_inner": {},
  "n_positions": {},
  "vocab_size": {vocab},
  "bos_token_id": {eos},
  "eos_token_id": {eos},
  "use_cache": true
}}
"#,
        cfg.hidden,
        cfg.heads,
        cfg.layers,
        cfg.intermediate,
        cfg.context,
        eos = vocab - 1
    )
}

/// Graph pieces shared by both kinds.
struct Parts {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    rng: Rng,
}

impl Parts {
    fn n(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<crate::graph::onnx::AttributeProto>,
    ) {
        self.nodes.push(node(op, name, inputs, outputs, attrs));
    }
    fn ms(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<crate::graph::onnx::AttributeProto>,
    ) {
        let mut n = node(op, name, inputs, outputs, attrs);
        n.domain = Some("com.microsoft".into());
        self.nodes.push(n);
    }
    fn weight(&mut self, name: &str, k: usize, n: usize) {
        let values = self.rng.normals(k * n, 1.0 / (k as f32).sqrt());
        self.inits.push(init(name, &[k, n], &values, FloatFormat::F32));
    }
    /// `out = x @ W` with a fresh `[k, n]` weight `{path}.weight` read by node `{path}/MatMul`.
    fn linear(&mut self, path: &str, x: &str, out: &str, k: usize, n: usize) {
        let w = format!("{}.weight", path.trim_start_matches('/').replace('/', "."));
        self.weight(&w, k, n);
        self.n("MatMul", &format!("{path}/MatMul"), &[x, &w], &[out], vec![]);
    }
    fn ones(&mut self, name: &str, n: usize) {
        self.inits.push(init(name, &[n], &vec![1.0; n], FloatFormat::F32));
    }
    /// The model of these nodes and initializers.
    fn finish(
        self,
        input: Vec<crate::graph::onnx::ValueInfoProto>,
        output: Vec<crate::graph::onnx::ValueInfoProto>,
        opset: i64,
        producer: &str,
    ) -> ModelProto {
        let graph = crate::graph::onnx::GraphProto {
            name: Some("main_graph".into()),
            node: self.nodes,
            initializer: self.inits,
            input,
            output,
            ..Default::default()
        };
        let mut proto = model(graph, opset);
        proto.producer_name = Some(producer.into());
        proto
    }

    /// SiLU MLP: down(silu(gate(x)) * up(x)).
    fn mlp(&mut self, p: &str, x: &str, out: &str, h: usize, m: usize) {
        let t = |s: &str| format!("{p}/mlp/{s}");
        self.linear(&t("gate_proj"), x, &t("gate"), h, m);
        self.linear(&t("up_proj"), x, &t("up"), h, m);
        self.n("Sigmoid", &t("act_fn/Sigmoid"), &[&t("gate")], &[&t("sig")], vec![]);
        self.n("Mul", &t("act_fn/Mul"), &[&t("gate"), &t("sig")], &[&t("silu")], vec![]);
        self.n("Mul", &t("Mul"), &[&t("silu"), &t("up")], &[&t("prod")], vec![]);
        self.linear(&t("down_proj"), &t("prod"), out, m, h);
    }
}

fn opset(domain: &str, version: i64) -> OperatorSetIdProto {
    OperatorSetIdProto { domain: Some(domain.into()), version: Some(version) }
}

/// The genai builder's graph (see the module doc).
pub fn genai_model(cfg: &DecoderConfig, vocab: usize) -> ModelProto {
    let (h, m, nh, kv) = (cfg.hidden, cfg.intermediate, cfg.heads, cfg.kv_heads);
    let d = h / nh;
    let mut p = Parts { nodes: vec![], inits: vec![], rng: Rng::new(cfg.seed) };
    // seqlens_k and total_sequence_length from the mask, as the builder computes them.
    let a = "/model/attn_mask_reformat/attn_mask_subgraph";
    p.inits.push(init_i64(&format!("{a}/axes"), &[1], &[1]));
    p.inits.push(init_i64(&format!("{a}/one"), &[], &[1]));
    p.inits.push(init_i64(&format!("{a}/index"), &[], &[1]));
    p.n(
        "ReduceSum",
        &format!("{a}/ReduceSum"),
        &["attention_mask", &format!("{a}/axes")],
        &[&format!("{a}/sum")],
        vec![attr_i("keepdims", 0)],
    );
    p.n("Sub", &format!("{a}/Sub"), &[&format!("{a}/sum"), &format!("{a}/one")], &[&format!("{a}/sub")], vec![]);
    p.n(
        "Cast",
        &format!("{a}/Sub/Cast"),
        &[&format!("{a}/sub")],
        &["seqlens_k"],
        vec![attr_i("to", DataType::Int32 as i64)],
    );
    p.n("Shape", &format!("{a}/Shape"), &["attention_mask"], &[&format!("{a}/shape")], vec![]);
    p.n(
        "Gather",
        &format!("{a}/Gather"),
        &[&format!("{a}/shape"), &format!("{a}/index")],
        &[&format!("{a}/total")],
        vec![attr_i("axis", 0)],
    );
    p.n(
        "Cast",
        &format!("{a}/Gather/Cast"),
        &[&format!("{a}/total")],
        &["total_seq_len"],
        vec![attr_i("to", DataType::Int32 as i64)],
    );
    // Tied embedding: the lm_head weight [hidden, vocab] transposed and gathered.
    let lm = "lm_head.MatMul.weight";
    p.weight(lm, h, vocab);
    p.n(
        "Transpose",
        "/model/embed_tokens/Transpose",
        &[lm],
        &["/model/embed_tokens/table"],
        vec![attr_ints("perm", &[1, 0])],
    );
    p.n(
        "Gather",
        "/model/embed_tokens/Gather",
        &["/model/embed_tokens/table", "input_ids"],
        &["/model/embed_tokens/out"],
        vec![],
    );
    // Rotary caches [context, head/2].
    let half = d / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for pos in 0..cfg.context {
        for i in 0..half {
            let angle = pos as f32 / 10000f32.powf(2.0 * i as f32 / d as f32);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    p.inits.push(init("cos_cache", &[cfg.context, half], &cos, FloatFormat::F32));
    p.inits.push(init("sin_cache", &[cfg.context, half], &sin, FloatFormat::F32));
    let mut residual = "/model/embed_tokens/out".to_string();
    let mut hidden_out: Option<String> = None;
    for l in 0..cfg.layers {
        let path = format!("/model/layers.{l}");
        let t = |s: &str| format!("{path}/{s}");
        let gamma = format!("model.layers.{l}.input_layernorm.weight");
        p.ones(&gamma, h);
        match &hidden_out {
            None => p.n(
                "SimplifiedLayerNormalization",
                &t("input_layernorm/LayerNorm"),
                &[&residual, &gamma],
                &[&t("ln1")],
                vec![attr_i("axis", -1), attr_f("epsilon", 1e-6), attr_i("stash_type", 1)],
            ),
            Some(x) => {
                let x = x.clone();
                p.ms(
                    "SkipSimplifiedLayerNormalization",
                    &t("input_layernorm/SkipLayerNorm"),
                    &[&x, &residual, &gamma],
                    &[&t("ln1"), "", "", &t("res1")],
                    vec![attr_f("epsilon", 1e-6)],
                );
                residual = t("res1");
            }
        }
        p.linear(&t("attn/qkv_proj"), &t("ln1"), &t("qkv"), h, (nh + 2 * kv) * d);
        let (pk, pv) = (format!("past_key_values.{l}.key"), format!("past_key_values.{l}.value"));
        let (ck, cv) = (format!("present.{l}.key"), format!("present.{l}.value"));
        p.ms(
            "GroupQueryAttention",
            &t("attn/GroupQueryAttention"),
            &[&t("qkv"), "", "", &pk, &pv, "seqlens_k", "total_seq_len", "cos_cache", "sin_cache"],
            &[&t("attn_out"), &ck, &cv],
            vec![
                attr_i("num_heads", nh as i64),
                attr_i("kv_num_heads", kv as i64),
                attr_i("do_rotary", 1),
                attr_i("local_window_size", cfg.local_window),
            ]
            .into_iter()
            // A window-sized cache, as the builder writes windowed layers (Gemma 3's local ones).
            .chain((cfg.local_window > 0).then(|| attr_i("sliding_window_cache", 1)))
            .collect(),
        );
        p.linear(&t("attn/o_proj"), &t("attn_out"), &t("o"), nh * d, h);
        let gamma2 = format!("model.layers.{l}.post_attention_layernorm.weight");
        p.ones(&gamma2, h);
        p.ms(
            "SkipSimplifiedLayerNormalization",
            &t("post_attention_layernorm/SkipLayerNorm"),
            &[&t("o"), &residual, &gamma2],
            &[&t("ln2"), "", "", &t("res2")],
            vec![attr_f("epsilon", 1e-6)],
        );
        residual = t("res2");
        p.mlp(&path, &t("ln2"), &t("mlp_out"), h, m);
        hidden_out = Some(t("mlp_out"));
    }
    p.ones("model.layers.norm.weight", h);
    let x = hidden_out.expect("at least one layer");
    p.ms(
        "SkipSimplifiedLayerNormalization",
        "/model/norm/SkipLayerNorm",
        &[&x, &residual, "model.layers.norm.weight"],
        &["/model/norm/out"],
        vec![attr_f("epsilon", 1e-6)],
    );
    p.n("MatMul", "/lm_head/MatMul", &["/model/norm/out", lm], &["logits"], vec![]);
    let f = DataType::Float as i32;
    let (b, s, past, total) = (
        Dim::Named("batch_size"),
        Dim::Named("sequence_length"),
        Dim::Named("past_sequence_length"),
        Dim::Named("total_sequence_length"),
    );
    let mut inputs = vec![
        io_named("input_ids", DataType::Int64 as i32, &[b, s]),
        io_named("attention_mask", DataType::Int64 as i32, &[b, total]),
    ];
    let mut outputs = vec![io_named("logits", f, &[b, s, Dim::Fixed(vocab)])];
    for l in 0..cfg.layers {
        for kvn in ["key", "value"] {
            inputs.push(io_named(
                &format!("past_key_values.{l}.{kvn}"),
                f,
                &[b, Dim::Fixed(kv), past, Dim::Named("head_size")],
            ));
            outputs.push(io_named(
                &format!("present.{l}.{kvn}"),
                f,
                &[b, Dim::Fixed(kv), total, Dim::Named("head_size")],
            ));
        }
    }
    let mut proto = p.finish(inputs, outputs, 21, "nibble example --kind genai (onnxruntime-genai builder layout)");
    proto.opset_import.push(opset("com.microsoft", 1));
    proto
}

/// The Optimum-style graph (see the module doc).
pub fn optimum_model(cfg: &DecoderConfig, vocab: usize) -> ModelProto {
    optimum_graph(cfg, vocab, true)
}

/// Optimum's merged decoder (see the module doc): `If(use_cache_branch)` over the decoder with
/// past (then) and without past (else), the weights shared as main-graph initializers.
pub fn optimum_merged_model(cfg: &DecoderConfig, vocab: usize) -> ModelProto {
    use crate::graph::onnx::{attribute_proto::AttributeType, AttributeProto, GraphProto};
    let mut with_past = optimum_graph(cfg, vocab, true);
    let without = optimum_graph(cfg, vocab, false).graph.expect("graph");
    let mut main = with_past.graph.take().expect("graph");
    // A branch: its tensors under `prefix` (names unique across the model), its node names kept,
    // reading the main graph's inputs and initializers by name.
    let branch = |g: &GraphProto, prefix: &str| -> GraphProto {
        let outer: std::collections::HashSet<&str> = g
            .input
            .iter()
            .filter_map(|v| v.name.as_deref())
            .chain(g.initializer.iter().filter_map(|t| t.name.as_deref()))
            .collect();
        let rename =
            |t: &String| if t.is_empty() || outer.contains(t.as_str()) { t.clone() } else { format!("{prefix}{t}") };
        let node = g
            .node
            .iter()
            .map(|n| NodeProto {
                // Node names as Optimum keeps them (each branch is a whole decoder graph).
                name: n.name.clone(),
                input: n.input.iter().map(rename).collect(),
                output: n.output.iter().map(rename).collect(),
                ..n.clone()
            })
            .collect();
        let output = g
            .output
            .iter()
            .map(|v| crate::graph::onnx::ValueInfoProto { name: v.name.as_ref().map(rename), ..v.clone() })
            .collect();
        GraphProto { name: Some(prefix.trim_start_matches('/').into()), node, output, ..Default::default() }
    };
    let graph_attr = |name: &str, g: GraphProto| AttributeProto {
        name: Some(name.into()),
        g: Some(g),
        r#type: Some(AttributeType::Graph as i32),
        ..Default::default()
    };
    let then_branch = branch(&main, "/with_past");
    let else_branch = branch(&without, "/no_past");
    let outputs: Vec<&str> = main.output.iter().filter_map(|v| v.name.as_deref()).collect();
    let the_if = node(
        "If",
        "optimum::if",
        &["use_cache_branch"],
        &outputs,
        vec![graph_attr("then_branch", then_branch), graph_attr("else_branch", else_branch)],
    );
    main.node = vec![the_if];
    main.input.push(io_named("use_cache_branch", DataType::Bool as i32, &[Dim::Fixed(1)]));
    with_past.graph = Some(main);
    with_past.producer_name = Some("nibble example --kind optimum-merged (Optimum merged decoder layout)".into());
    with_past
}

/// The Optimum-style graph; without `past`, the present key/value are the current step's only
/// (the cache inputs are declared and unread, as in a merged decoder's no-past branch).
fn optimum_graph(cfg: &DecoderConfig, vocab: usize, past: bool) -> ModelProto {
    let (h, m, nh) = (cfg.hidden, cfg.intermediate, cfg.heads);
    let d = h / nh;
    let mut p = Parts { nodes: vec![], inits: vec![], rng: Rng::new(cfg.seed) };
    let wte = "transformer.wte.weight";
    let values = p.rng.normals(vocab * h, 0.5);
    p.inits.push(init(wte, &[vocab, h], &values, FloatFormat::F32));
    let values = p.rng.normals(cfg.context * h, 0.1);
    p.inits.push(init("transformer.wpe.weight", &[cfg.context, h], &values, FloatFormat::F32));
    p.n("Gather", "/transformer/wte/Gather", &[wte, "input_ids"], &["/transformer/tok"], vec![]);
    p.n(
        "Gather",
        "/transformer/wpe/Gather",
        &["transformer.wpe.weight", "position_ids"],
        &["/transformer/pos"],
        vec![],
    );
    p.n("Add", "/transformer/Add", &["/transformer/tok", "/transformer/pos"], &["/transformer/h0"], vec![]);
    // Additive mask [batch, 1, S, P + S]: 0 where key j <= P + i and attention_mask is 1, else -1e9.
    let a = "/transformer/mask";
    let t = |s: &str| format!("{a}/{s}");
    p.inits.push(init_i64(&t("i1"), &[], &[1]));
    p.inits.push(init_i64(&t("axes0"), &[1], &[0]));
    p.inits.push(init_i64(&t("axes12"), &[2], &[1, 2]));
    p.inits.push(init(&t("one"), &[], &[1.0], FloatFormat::F32));
    p.inits.push(init(&t("big"), &[], &[1e9], FloatFormat::F32));
    p.n("Shape", &t("ids/Shape"), &["input_ids"], &[&t("ids_shape")], vec![]);
    p.n("Gather", &t("ids/Gather"), &[&t("ids_shape"), &t("i1")], &[&t("s")], vec![attr_i("axis", 0)]);
    p.n("Shape", &t("am/Shape"), &["attention_mask"], &[&t("am_shape")], vec![]);
    p.n("Gather", &t("am/Gather"), &[&t("am_shape"), &t("i1")], &[&t("total")], vec![attr_i("axis", 0)]);
    p.n("Sub", &t("past/Sub"), &[&t("total"), &t("s")], &[&t("past")], vec![]);
    p.n("Unsqueeze", &t("s/Unsqueeze"), &[&t("s"), &t("axes0")], &[&t("s1")], vec![]);
    p.n("Unsqueeze", &t("total/Unsqueeze"), &[&t("total"), &t("axes0")], &[&t("total1")], vec![]);
    p.n("Concat", &t("Concat"), &[&t("s1"), &t("total1")], &[&t("square")], vec![attr_i("axis", 0)]);
    let mut one = crate::graph::build::init(&t("one_value"), &[1], &[1.0], FloatFormat::F32);
    one.name = None;
    let mut fill = attr_i("value", 0);
    fill.i = None;
    fill.t = Some(one);
    fill.r#type = Some(crate::graph::onnx::attribute_proto::AttributeType::Tensor as i32);
    p.n("ConstantOfShape", &t("ConstantOfShape"), &[&t("square")], &[&t("ones")], vec![fill]);
    p.n("Trilu", &t("Trilu"), &[&t("ones"), &t("past")], &[&t("causal")], vec![attr_i("upper", 0)]);
    p.n("Cast", &t("am/Cast"), &["attention_mask"], &[&t("am_f")], vec![attr_i("to", DataType::Float as i64)]);
    p.n("Unsqueeze", &t("am/Unsqueeze"), &[&t("am_f"), &t("axes12")], &[&t("am4")], vec![]);
    p.n("Mul", &t("allowed/Mul"), &[&t("causal"), &t("am4")], &[&t("allowed")], vec![]);
    p.n("Sub", &t("bias/Sub"), &[&t("allowed"), &t("one")], &[&t("neg")], vec![]);
    p.n("Mul", &t("bias/Mul"), &[&t("neg"), &t("big")], &[&t("bias")], vec![]);
    let bias = t("bias");
    p.inits.push(init_i64("/transformer/heads_shape", &[4], &[0, 0, nh as i64, d as i64]));
    p.inits.push(init_i64("/transformer/merge_shape", &[3], &[0, 0, h as i64]));
    p.inits.push(init("/transformer/scale", &[], &[1.0 / (d as f32).sqrt()], FloatFormat::F32));
    let mut x = "/transformer/h0".to_string();
    let ln = |p: &mut Parts, name: &str, x: &str, out: &str| {
        p.ones(&format!("{name}.weight"), h);
        p.inits.push(init(&format!("{name}.bias"), &[h], &vec![0.0; h], FloatFormat::F32));
        p.n(
            "LayerNormalization",
            &format!("/{}/LayerNormalization", name.replace('.', "/")),
            &[x, &format!("{name}.weight"), &format!("{name}.bias")],
            &[out],
            vec![attr_i("axis", -1), attr_f("epsilon", 1e-5)],
        );
    };
    for l in 0..cfg.layers {
        let path = format!("/transformer/h.{l}");
        let t = |s: &str| format!("{path}/{s}");
        ln(&mut p, &format!("transformer.h.{l}.ln_1"), &x, &t("ln1"));
        for proj in ["q", "k", "v"] {
            p.linear(&t(&format!("attn/{proj}_proj")), &t("ln1"), &t(proj), h, h);
            p.n(
                "Reshape",
                &t(&format!("attn/{proj}/Reshape")),
                &[&t(proj), "/transformer/heads_shape"],
                &[&t(&format!("{proj}4"))],
                vec![],
            );
            p.n(
                "Transpose",
                &t(&format!("attn/{proj}/Transpose")),
                &[&t(&format!("{proj}4"))],
                &[&t(&format!("{proj}h"))],
                vec![attr_ints("perm", &[0, 2, 1, 3])],
            );
        }
        let (pk, pv) = (format!("past_key_values.{l}.key"), format!("past_key_values.{l}.value"));
        let (ck, cv) = (format!("present.{l}.key"), format!("present.{l}.value"));
        if past {
            p.n("Concat", &t("attn/key/Concat"), &[&pk, &t("kh")], &[&ck], vec![attr_i("axis", 2)]);
            p.n("Concat", &t("attn/value/Concat"), &[&pv, &t("vh")], &[&cv], vec![attr_i("axis", 2)]);
        } else {
            p.n("Identity", &t("attn/key/Identity"), &[&t("kh")], &[&ck], vec![]);
            p.n("Identity", &t("attn/value/Identity"), &[&t("vh")], &[&cv], vec![]);
        }
        p.n("Transpose", &t("attn/key/Transpose"), &[&ck], &[&t("kt")], vec![attr_ints("perm", &[0, 1, 3, 2])]);
        p.n("MatMul", &t("attn/scores/MatMul"), &[&t("qh"), &t("kt")], &[&t("scores")], vec![]);
        p.n("Mul", &t("attn/scores/Mul"), &[&t("scores"), "/transformer/scale"], &[&t("scaled")], vec![]);
        p.n("Add", &t("attn/scores/Add"), &[&t("scaled"), &bias], &[&t("masked")], vec![]);
        p.n("Softmax", &t("attn/Softmax"), &[&t("masked")], &[&t("probs")], vec![attr_i("axis", -1)]);
        p.n("MatMul", &t("attn/context/MatMul"), &[&t("probs"), &cv], &[&t("ctx")], vec![]);
        p.n(
            "Transpose",
            &t("attn/context/Transpose"),
            &[&t("ctx")],
            &[&t("ctx_t")],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
        );
        p.n("Reshape", &t("attn/context/Reshape"), &[&t("ctx_t"), "/transformer/merge_shape"], &[&t("ctx_m")], vec![]);
        p.linear(&t("attn/o_proj"), &t("ctx_m"), &t("o"), h, h);
        p.n("Add", &t("attn/residual/Add"), &[&x, &t("o")], &[&t("x2")], vec![]);
        ln(&mut p, &format!("transformer.h.{l}.ln_2"), &t("x2"), &t("ln2"));
        p.mlp(&path, &t("ln2"), &t("mlp_out"), h, m);
        p.n("Add", &t("mlp/residual/Add"), &[&t("x2"), &t("mlp_out")], &[&t("x3")], vec![]);
        x = t("x3");
    }
    ln(&mut p, "transformer.ln_f", &x, "/transformer/ln_f/out");
    p.linear("/lm_head", "/transformer/ln_f/out", "logits", h, vocab);
    let f = DataType::Float as i32;
    let i64t = DataType::Int64 as i32;
    let (b, s, past) = (Dim::Named("batch_size"), Dim::Named("sequence_length"), Dim::Named("past_sequence_length"));
    let total = Dim::Named("past_sequence_length + sequence_length");
    let mut inputs = vec![
        io_named("input_ids", i64t, &[b, s]),
        io_named("attention_mask", i64t, &[b, total]),
        io_named("position_ids", i64t, &[b, s]),
    ];
    let mut outputs = vec![io_named("logits", f, &[b, s, Dim::Fixed(vocab)])];
    for l in 0..cfg.layers {
        for kvn in ["key", "value"] {
            inputs.push(io_named(&format!("past_key_values.{l}.{kvn}"), f, &[b, Dim::Fixed(nh), past, Dim::Fixed(d)]));
            outputs.push(io_named(&format!("present.{l}.{kvn}"), f, &[b, Dim::Fixed(nh), total, Dim::Fixed(d)]));
        }
    }
    p.finish(inputs, outputs, 17, "nibble example --kind optimum (Optimum export layout)")
}

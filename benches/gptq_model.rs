//! GPTQ's kernel-crate stages over the weights of a 135M-parameter Llama-style LM (30 layers,
//! hidden 576, 9 query / 3 key-value heads of 64, MLP 1536), T = 2048 calibration rows
//! (16 samples x 128 tokens) per activation, random data: Hessians (added per sample, as waves
//! deliver them), one factor per activation (q/k/v and gate/up share theirs), and
//! `gptq_quantize_factored` for every weight, block 128. Prints the time of each stage and the
//! total (calibration forward passes through ONNX Runtime are not included).
//!
//! `cargo bench --bench gptq_model`

mod common;
use common::data;
use nibble::gptq::{gptq_quantize_factored, GptqFactor, GptqParams, Hessian};
use nibble::{BlockSize, WeightData};
use std::time::{Duration, Instant};

fn main() {
    let (layers, t, samples) = (30usize, 2048usize, 16usize);
    // (K, the N of each weight fed by that activation)
    let groups: [(usize, &[usize]); 4] = [(576, &[576, 192, 192]), (576, &[576]), (576, &[1536, 1536]), (1536, &[576])];
    let x576 = data(t * 576, 1);
    let x1536 = data(t * 1536, 2);
    let weights: Vec<Vec<f32>> = [576usize * 576, 576 * 192, 576 * 1536].iter().map(|&l| data(l, 3)).collect();
    let params = GptqParams::new(BlockSize::Blocked(128));
    let (mut th, mut tf, mut tq) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    for _ in 0..layers {
        for (k, ns) in groups {
            let x = if k == 576 { &x576 } else { &x1536 };
            let t0 = Instant::now();
            let mut h = Hessian::new(k);
            for sample in x.chunks(t / samples * k) {
                h.add_batch(sample).unwrap();
            }
            th += t0.elapsed();
            let t0 = Instant::now();
            let f = GptqFactor::new(&h, params.percdamp, params.act_order).unwrap();
            tf += t0.elapsed();
            let t0 = Instant::now();
            for &n in ns {
                let w = &weights.iter().find(|w| w.len() == k * n).unwrap()[..];
                std::hint::black_box(gptq_quantize_factored(WeightData::F32(w), &f, &params).unwrap());
            }
            tq += t0.elapsed();
        }
    }
    println!(
        "135M-shaped LM, {layers} layers, T = {t}: Hessians {:.2} s, factors {:.2} s, gptq {:.2} s, total {:.2} s ({} rayon threads)",
        th.as_secs_f64(),
        tf.as_secs_f64(),
        tq.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );
}

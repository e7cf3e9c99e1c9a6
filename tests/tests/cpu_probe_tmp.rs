mod common;
use common::*;
use panguc_runtime::Engine;

#[test]
fn probe() {
    let f = fixture();
    let ckpt = checkpoint();
    for g in GRAPHS {
        let m = module(&ckpt, g);
        let mut s = session(&m, &ckpt);
        let mut e = f.engine(g, 2);
        let prompt: Vec<i64> = (0..20).map(|i| (i * 37 + 5) % 512).collect();
        let a = e.forward(&prompt).unwrap();
        let b = s.forward(&prompt).unwrap();
        let mx = b.as_f32().iter().fold(0f32, |m, x| m.max(x.abs()));
        let md = a.as_f32().iter().zip(b.as_f32()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        println!("{g:?} prefill rel {} maxabs {mx} absdiff {md}", a.max_rel_diff(&b, 1e-3));
        for t in [7i64, 100, 3] {
            let a = e.forward(&[t]).unwrap();
            let b = s.forward(&[t]).unwrap();
            println!("{g:?} decode rel diff {}", a.max_rel_diff(&b, 1e-3));
        }
    }
}

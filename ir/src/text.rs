//! The canonical text format: one op per line, MLIR-like.
//!
//! ```text
//! module @tiny entry @main
//!
//! func @f(
//!   %x: f32[tokens,64],
//!   %w: bf16[64,64] = weight "self_attn.q_proj.weight",
//! ) {
//!   %y = matmul(%x, %w) {transpose_b = true} : f32[tokens,64]
//!   return %y
//! }
//! ```
//!
//! `print(parse(print(m))) == print(m)` holds for every verified module.

use crate::graph::{Function, Module, ParamKind, ValueId};
use crate::op::{Attr, AttrMap, Op};
use crate::shape::{Dim, TensorType};
use crate::DType;
use std::collections::HashMap;
use std::fmt::Write;

/// Print a module in canonical form.
pub fn print_module(m: &Module) -> String {
    let mut out = format!("module @{} entry @{}\n", m.name, m.entry);
    for f in m.functions.values() {
        out.push('\n');
        out.push_str(&print_function(f));
    }
    out
}

pub fn print_function(f: &Function) -> String {
    let mut out = format!("func @{}(\n", f.name);
    for p in &f.params {
        let v = f.value(p.value);
        let _ = write!(out, "  %{}: {}", v.name, v.ty);
        if let ParamKind::Weight { tensor } = &p.kind {
            let _ = write!(out, " = weight {}", quote(tensor));
        }
        out.push_str(",\n");
    }
    out.push_str(") {\n");
    for n in &f.nodes {
        let results: Vec<String> = n.results.iter().map(|r| format!("%{}", f.name_of(*r))).collect();
        let args: Vec<String> = n.args.iter().map(|a| format!("%{}", f.name_of(*a))).collect();
        let _ = write!(out, "  {} = {}({})", results.join(", "), n.op.mnemonic(), args.join(", "));
        let attrs = n.op.attrs();
        if !attrs.is_empty() {
            let parts: Vec<String> = attrs.iter().map(|(k, v)| format!("{k} = {}", print_attr(v))).collect();
            let _ = write!(out, " {{{}}}", parts.join(", "));
        }
        let tys: Vec<String> = n.results.iter().map(|r| f.ty(*r).to_string()).collect();
        let _ = writeln!(out, " : {}", tys.join(", "));
    }
    let outs: Vec<String> = f.outputs.iter().map(|o| format!("%{}", f.name_of(*o))).collect();
    let _ = writeln!(out, "  return {}", outs.join(", "));
    out.push_str("}\n");
    out
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn print_attr(a: &Attr) -> String {
    match a {
        Attr::Bool(b) => b.to_string(),
        Attr::Int(i) => i.to_string(),
        Attr::Float(f) => format!("{f:?}"),
        Attr::Str(s) => quote(s),
        Attr::Type(t) => t.to_string(),
        Attr::Ints(v) => format!("[{}]", v.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")),
        Attr::Dims(v) => format!("[{}]", v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// A parse error with its 1-based line number.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

struct Cursor<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn line(&self) -> usize {
        self.src[..self.pos].matches('\n').count() + 1
    }

    fn err<T>(&self, msg: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError { line: self.line(), message: msg.into() })
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn skip_ws(&mut self) {
        loop {
            let r = self.rest();
            let trimmed = r.trim_start();
            self.pos += r.len() - trimmed.len();
            if trimmed.starts_with("//") {
                self.pos += trimmed.find('\n').unwrap_or(trimmed.len());
            } else {
                break;
            }
        }
    }

    fn peek(&mut self, tok: &str) -> bool {
        self.skip_ws();
        self.rest().starts_with(tok)
    }

    fn eat(&mut self, tok: &str) -> bool {
        if self.peek(tok) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: &str) -> Result<(), ParseError> {
        if self.eat(tok) {
            Ok(())
        } else {
            let found: String = self.rest().chars().take(20).collect();
            self.err(format!("expected `{tok}`, found `{found}`"))
        }
    }

    /// Identifier-like word: letters, digits, `_`, `.`, `-` (for numbers).
    fn word(&mut self) -> Result<&'a str, ParseError> {
        self.skip_ws();
        let r = self.rest();
        let len = r
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '+')))
            .map(|(i, _)| i)
            .unwrap_or(r.len());
        if len == 0 {
            return self.err(format!("expected a name, found `{}`", r.chars().take(20).collect::<String>()));
        }
        self.pos += len;
        Ok(&r[..len])
    }

    fn sigil_name(&mut self, sigil: &str) -> Result<&'a str, ParseError> {
        self.expect(sigil)?;
        let r = self.rest();
        let len = r
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.')))
            .map(|(i, _)| i)
            .unwrap_or(r.len());
        if len == 0 {
            return self.err(format!("expected a name after `{sigil}`"));
        }
        self.pos += len;
        Ok(&r[..len])
    }

    fn string(&mut self) -> Result<String, ParseError> {
        self.expect("\"")?;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, e)) => out.push(e),
                    None => break,
                },
                '\n' => break,
                c => out.push(c),
            }
        }
        self.err("unterminated string")
    }

    fn ty(&mut self) -> Result<TensorType, ParseError> {
        self.skip_ws();
        let r = self.rest();
        let len = r.find('[').unwrap_or(0);
        let dtype: DType = match r[..len].parse() {
            Ok(d) => d,
            Err(e) => return self.err(e),
        };
        self.pos += len + 1;
        let close = match self.rest().find(']') {
            Some(c) => c,
            None => return self.err("unterminated shape"),
        };
        let inner = &self.rest()[..close];
        let shape = if inner.trim().is_empty() {
            vec![]
        } else {
            match inner.split(',').map(Dim::parse).collect::<Result<Vec<_>, _>>() {
                Ok(s) => s,
                Err(e) => return self.err(e),
            }
        };
        self.pos += close + 1;
        Ok(TensorType::new(dtype, shape))
    }

    fn attr_value(&mut self) -> Result<Attr, ParseError> {
        if self.peek("\"") {
            return Ok(Attr::Str(self.string()?));
        }
        if self.eat("[") {
            let close = match self.rest().find(']') {
                Some(c) => c,
                None => return self.err("unterminated list"),
            };
            let inner = self.rest()[..close].to_string();
            self.pos += close + 1;
            if inner.trim().is_empty() {
                return Ok(Attr::Ints(vec![]));
            }
            let items: Vec<&str> = inner.split(',').map(str::trim).collect();
            if let Ok(ints) = items.iter().map(|s| s.parse::<i64>()).collect::<Result<Vec<_>, _>>() {
                return Ok(Attr::Ints(ints));
            }
            return match items.iter().map(|s| Dim::parse(s)).collect::<Result<Vec<_>, _>>() {
                Ok(d) => Ok(Attr::Dims(d)),
                Err(e) => self.err(e),
            };
        }
        let w = self.word()?;
        match w {
            "true" => return Ok(Attr::Bool(true)),
            "false" => return Ok(Attr::Bool(false)),
            _ => {}
        }
        if let Ok(t) = w.parse::<DType>() {
            return Ok(Attr::Type(t));
        }
        if let Ok(i) = w.parse::<i64>() {
            return Ok(Attr::Int(i));
        }
        if let Ok(f) = w.parse::<f64>() {
            return Ok(Attr::Float(f));
        }
        self.err(format!("bad attribute value `{w}`"))
    }
}

/// Parse a module from canonical text. The result is verified.
pub fn parse_module(src: &str) -> Result<Module, ParseError> {
    let mut c = Cursor { src, pos: 0 };
    c.expect("module")?;
    let name = c.sigil_name("@")?.to_string();
    c.expect("entry")?;
    let entry = c.sigil_name("@")?.to_string();
    let mut module = Module::new(name, entry);
    loop {
        c.skip_ws();
        if c.rest().is_empty() {
            break;
        }
        let f = parse_function(&mut c, &module)?;
        if module.functions.contains_key(&f.name) {
            return c.err(format!("function @{} defined twice", f.name));
        }
        module.add_function(f);
    }
    crate::verify::verify_module(&module).map_err(|e| ParseError { line: 0, message: e })?;
    Ok(module)
}

fn parse_function(c: &mut Cursor, _module: &Module) -> Result<Function, ParseError> {
    c.expect("func")?;
    let mut f = Function::new(c.sigil_name("@")?);
    let mut env: HashMap<String, ValueId> = HashMap::new();
    c.expect("(")?;
    while !c.eat(")") {
        let name = c.sigil_name("%")?.to_string();
        c.expect(":")?;
        let ty = c.ty()?;
        let id = if c.eat("=") {
            c.expect("weight")?;
            let tensor = c.string()?;
            f.add_weight(&name, &tensor, ty)
        } else {
            f.add_input(&name, ty)
        };
        if f.name_of(id) != name {
            return c.err(format!("value %{name} defined twice"));
        }
        env.insert(name, id);
        if !c.eat(",") && !c.peek(")") {
            return c.err("expected `,` or `)` after a parameter");
        }
    }
    c.expect("{")?;
    loop {
        if c.eat("}") {
            break;
        }
        if c.eat("return") {
            loop {
                let n = c.sigil_name("%")?;
                let id = *env
                    .get(n)
                    .ok_or_else(|| ParseError { line: c.line(), message: format!("return of undefined %{n}") })?;
                f.outputs.push(id);
                if !c.eat(",") {
                    break;
                }
            }
            continue;
        }
        let mut results = vec![c.sigil_name("%")?.to_string()];
        while c.eat(",") {
            results.push(c.sigil_name("%")?.to_string());
        }
        c.expect("=")?;
        let mnemonic = c.word()?.to_string();
        c.expect("(")?;
        let mut args = vec![];
        while !c.eat(")") {
            let n = c.sigil_name("%")?;
            match env.get(n) {
                Some(id) => args.push(*id),
                None => return c.err(format!("use of undefined value %{n}")),
            }
            if !c.eat(",") && !c.peek(")") {
                return c.err("expected `,` or `)` in operands");
            }
        }
        let mut attrs = AttrMap::default();
        if c.eat("{") {
            while !c.eat("}") {
                let key = c.word()?.to_string();
                c.expect("=")?;
                let v = c.attr_value()?;
                attrs.0.push((key, v));
                if !c.eat(",") && !c.peek("}") {
                    return c.err("expected `,` or `}` in attributes");
                }
            }
        }
        let op = match Op::from_parts(&mnemonic, &attrs) {
            Ok(op) => op,
            Err(e) => return c.err(e),
        };
        c.expect(":")?;
        let mut tys = vec![c.ty()?];
        while c.eat(",") {
            tys.push(c.ty()?);
        }
        if tys.len() != results.len() {
            return c.err(format!("{} results but {} types", results.len(), tys.len()));
        }
        let named: Vec<(&str, TensorType)> = results.iter().map(String::as_str).zip(tys).collect();
        let ids = f.push_node_typed(op, &args, &named);
        for (n, id) in results.iter().zip(ids) {
            if f.name_of(id) != n || env.contains_key(n) {
                return c.err(format!("value %{n} defined twice"));
            }
            env.insert(n.clone(), id);
        }
    }
    Ok(f)
}

//! Chat templates render as `transformers`' `apply_chat_template(.., tokenize=False)` does;
//! the expected strings come from `transformers` 5.24 with Jinja2 3.1.6.

use tern_text::{ChatTemplate, Message, TextError};

/// SmolLM2-135M-Instruct's `tokenizer.chat_template`.
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Meta-Llama-3-8B-Instruct's template.
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// The start of Llama 3.1's template: whitespace control, `is defined`, slicing, `trim`.
const LLAMA31_HEAD: &str = r#"{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

/// Gemma's template, which refuses conversations with `raise_exception`.
const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";

/// The clock the templates read: 2024-07-26 17:05:09 UTC, in milliseconds.
fn clock() -> i64 {
    1_722_013_509_000
}

fn user(content: &str) -> Message {
    Message::new("user", content)
}

fn system(content: &str) -> Message {
    Message::new("system", content)
}

#[test]
fn smollm2_adds_its_default_system_prompt() {
    let template = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
    let text = template.render(&[user("Hello!")], true, &clock).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    );
    let text = template
        .render(
            &[system("You are terse."), user("What is 2+2?")],
            false,
            &clock,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    );
}

#[test]
fn llama3_prints_bos_and_trims_content() {
    let template = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
    let text = template
        .render(
            &[system("You are terse."), user("  What is 2+2?\n")],
            true,
            &clock,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn llama31_whitespace_control() {
    let template = ChatTemplate::new(LLAMA31_HEAD, "<|begin_of_text|>", "<|eot_id|>").unwrap();
    let text = template.render(&[user("Hello!")], false, &clock).unwrap();
    assert_eq!(
        text,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\
         Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
    );
}

#[test]
fn raise_exception_is_a_render_error() {
    let template = ChatTemplate::new(GEMMA, "<bos>", "<eos>").unwrap();
    let err = template
        .render(&[system("sys"), user("hi")], true, &clock)
        .unwrap_err();
    assert!(
        matches!(&err, TextError::TemplateRender { message } if message.contains("System role not supported")),
        "{err}"
    );
    let text = template
        .render(
            &[user("hi"), Message::new("assistant", "yo ")],
            true,
            &clock,
        )
        .unwrap();
    assert_eq!(
        text,
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn broken_templates_are_errors() {
    for source in [
        "{% for m in messages %}",
        "{{ messages[0].content ",
        "{% if %}{% endif %}",
    ] {
        let err = ChatTemplate::new(source, "", "").unwrap_err();
        assert!(
            matches!(err, TextError::TemplateSyntax { .. }),
            "{source:?}: {err}"
        );
    }
    // Errors that only show when rendering: an unknown filter, attributes of undefined.
    let template = ChatTemplate::new("{{ messages | no_such_filter }}", "", "").unwrap();
    assert!(matches!(
        template.render(&[], true, &clock),
        Err(TextError::TemplateRender { .. })
    ));
    let template = ChatTemplate::new("{{ nothing.here }}", "", "").unwrap();
    assert!(matches!(
        template.render(&[], true, &clock),
        Err(TextError::TemplateRender { .. })
    ));
}

#[test]
fn python_flavoured_templates() {
    // Qwen-style reversed iteration over an empty list, string methods, tojson of messages.
    let source = "{% for m in messages[::-1] %}{{ m.content.split('</think>')[-1].lstrip('\\n') }}|{% endfor %}\
                  {{ messages | tojson }}{{ strftime_now('%Y') | length }}";
    let template = ChatTemplate::new(source, "", "").unwrap();
    assert_eq!(template.render(&[], false, &clock).unwrap(), "[]4");
    let text = template
        .render(&[user("<think>x</think>\n\nans"), user("b")], false, &clock)
        .unwrap();
    assert_eq!(
        text,
        "b|ans|[{\"role\": \"user\", \"content\": \"<think>x</think>\\n\\nans\"}, {\"role\": \"user\", \"content\": \"b\"}]4"
    );
}

#[test]
fn long_conversations_render_within_the_limits() {
    // 300 turns of 4 KiB, and 100 of 40 KB (about 4 MB of prompt, near the output limit).
    for (n, bytes) in [(300, 4096), (100, 40_000)] {
        let messages: Vec<Message> = (0..n)
            .map(|i| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                Message::new(role, "y".repeat(bytes))
            })
            .collect();
        for (name, source) in [
            ("smollm2", SMOLLM2),
            ("llama3", LLAMA3),
            ("llama3.1", LLAMA31_HEAD),
        ] {
            let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
            let text = template.render(&messages, true, &clock);
            let text = text.unwrap_or_else(|e| panic!("{name}, {n} x {bytes} bytes: {e}"));
            assert!(text.len() > n * bytes, "{name}");
        }
    }
}

#[test]
fn messages_deserialize_from_json() {
    let messages: Vec<Message> =
        serde_json::from_str(r#"[{"role":"user","content":"hi"}]"#).unwrap();
    assert_eq!(messages, [user("hi")]);
}

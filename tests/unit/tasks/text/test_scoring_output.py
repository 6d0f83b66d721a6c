"""`kiln score`'s table never passes a control character of the input to the terminal."""

from tasks.text.scoring import SentenceScore, format_scores, printable


def test_control_characters_are_escaped():
    title = "\x1b]0;owned\x07hello"
    assert printable(title) == "\\x1b]0;owned\\x07hello"
    assert printable("naïve café") == "naïve café"  # printable non-ASCII text stays as it is


def test_the_table_escapes_sentences_and_tokens():
    score = SentenceScore(
        model="ngram",
        sentence="a\x1b[2Jb",
        tokens=["a\x1b[2Jb", "</s>"],
        unknown=[True, False],
        token_log10=[-3.0, -1.0],
        log10_prob=-4.0,
        perplexity=100.0,
    )
    table = format_scores([score])
    assert "\x1b" not in table and "a\\x1b[2Jb" in table

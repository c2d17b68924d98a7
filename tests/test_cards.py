"""model_cards/ holds exactly one up-to-date card per zoo model and tag."""
import pytest

from zoo import cards


def test_every_model_and_tag_has_an_up_to_date_card():
    names = cards.card_names()
    on_disk = sorted(p.stem for p in cards.CARDS_DIR.glob('*.md'))
    assert on_disk == sorted(names), 'run `zoo card --all` to regenerate model_cards/'
    for name in names:
        assert (cards.CARDS_DIR / f'{name}.md').read_text() == cards.card_for_name(name), (
            f'model_cards/{name}.md is out of date: run `zoo card --all`')


def test_card_holds_the_facts_a_user_needs():
    card = cards.card_for_name('spartan_tiny.in1k')
    for fact in ('license: apache-2.0', '- arxiv:2507.10999', 'Params (M):** 3.82', 'GMACs:** 1.04 at 256x256',
                 'henry-pay/SpaRTAN-S', '## Intended use', '## Limitations', 'could not be confirmed offline'):
        assert fact in card, fact


def test_unknown_name_is_refused():
    with pytest.raises(RuntimeError, match='did you mean spartan_tiny'):
        cards.card_for_name('spartan_tin')

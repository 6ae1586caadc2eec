"""The training tab's tests, run on this host profile's gradio (3.41.2 for A1111, 4.40.0 for Forge)."""

from tests.core.test_training_ui import (  # noqa: F401  (pytest collects the imported tests)
    tab,
    test_create_explains_invalid_input_next_to_each_field,
    test_defaults_follow_the_loaded_model_family,
    test_refresh_without_jobs_and_loss_chart,
    test_start_reports_problems_and_presets_round_trip,
    test_the_poll_shows_no_pending_state_and_the_chart_fits_its_column,
)

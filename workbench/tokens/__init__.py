"""Token dropping and merging: vision (`vision`) and text (`text`)."""
